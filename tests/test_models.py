"""flatmin.models: shapes, published parameter counts, the Dropout baseline, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatmin.errors import UnknownNameError
from flatmin.models import MODELS, create_model

BIG = ("wrn28_10", "pyramidnet164_270")  # forward once, batch 1: the CI machine has 2 slow cores
SMALL_INPUT = {"mlp": (1, 40), "cnn1d": (1, 40), "cnn28": (1, 28, 28), "cnn28_small": (1, 28, 28)}

# Parameter counts for 10 / 100 classes and where the reference number comes from.
PARAMS = {
    # kuangliu/pytorch-cifar PreActResNet18 has 11,171,146; He et al.'s design adds the final
    # BN before pooling (+2*512), which we keep.
    "preactresnet18": (11_172_170, 11_218_340),
    "vgg16": (14_728_266, 14_774_436),  # kuangliu/pytorch-cifar VGG('VGG16'): 14,728,266
    "wrn28_10": (36_479_194, 36_536_884),  # Zagoruyko & Komodakis: 36.5M
    "wrn28_2": (1_467_610, 1_479_220),  # 1.5M
    "pyramidnet164_270": (27_216_021, 27_319_071),  # osmr/imgclsmob; Han et al. report 27.0M
    "pyramidnet110_48": (1_772_706, 1_778_556),  # osmr/imgclsmob; Han et al. report 1.7M
    "mlp": (15_210, 24_300),  # MNIST-1D MLPBase, hidden 100: 15,210
    "cnn1d": (5_210, 16_550),  # MNIST-1D ConvBase: 5,210
    # 1·32·25+32 + 32·64·25+64 + 64·7·7·128+128 + 128·10+10 (and 16/32/64 for the small one)
    "cnn28": (454_922, 466_532),
    "cnn28_small": (114_314, 120_164),
}
# Rounded numbers as published (papers / reference implementations), 10 classes.
PUBLISHED = {
    "preactresnet18": 11.17e6,
    "vgg16": 14.73e6,
    "wrn28_10": 36.5e6,
    "wrn28_2": 1.47e6,
    "pyramidnet164_270": 27.2e6,
    "pyramidnet110_48": 1.77e6,
    "mlp": 15_210,
    "cnn1d": 5_210,
    "cnn28": 454_922,  # our own LeNet-style nets: the sums above, worked by hand
    "cnn28_small": 114_314,
}


def build(name: str, num_classes: int = 10, **kw) -> nn.Module:
    shape = SMALL_INPUT.get(name, (3, 32, 32))
    return create_model(name, num_classes, input_shape=kw.pop("input_shape", shape), **kw)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family() -> None:
    assert set(MODELS) == set(PARAMS)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", [n for n in MODELS if n not in BIG])
def test_forward_shape(name: str, num_classes: int) -> None:
    model = build(name, num_classes)
    x = torch.randn(2, *SMALL_INPUT.get(name, (3, 32, 32)))
    assert model(x).shape == (2, num_classes)


@pytest.mark.parametrize("name", BIG)
def test_forward_shape_big_models(name: str) -> None:
    model = build(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name: str) -> None:
    ten, hundred = n_params(build(name, 10)), n_params(build(name, 100))
    assert (ten, hundred) == PARAMS[name]
    assert abs(ten - PUBLISHED[name]) / PUBLISHED[name] < 0.01


def test_pyramidnet_widths_follow_additive_rule() -> None:
    model = build("pyramidnet164_270")
    # 54 bottleneck blocks, width grows by 270/54 = 5 per block: 16 + 5 * 54 = 286, x4 output
    assert model.head.fc.in_features == 286 * 4
    assert build("pyramidnet110_48").head.fc.in_features == 64  # 16 + 48


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "wrn28_2", "pyramidnet110_48"])
def test_dropout_only_in_train_mode(name: str) -> None:
    torch.manual_seed(0)
    shape = SMALL_INPUT.get(name, (3, 8, 8))  # global pooling lets the CIFAR nets run small
    model = build(name, dropout=0.1, input_shape=shape)
    x = torch.randn(2, *shape)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", [n for n in MODELS if n != "wrn28_10"])
def test_dropout_after_every_relu_and_state_dicts_compatible(name: str) -> None:
    plain, dropped = build(name), build(name, dropout=0.1)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    n_relu = sum(isinstance(m, nn.ReLU) for m in dropped.modules())
    drops = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    assert n_relu > 0 and len(drops) == n_relu and all(d.p == 0.1 for d in drops)
    # Dropout adds no parameters or buffers and moves no key: checkpoints load either way
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict())


def test_no_inplace_relu() -> None:
    for name in ("preactresnet18", "pyramidnet110_48", "cnn1d"):
        assert not any(getattr(m, "inplace", False) for m in build(name).modules())


def test_deterministic_given_seed() -> None:
    torch.manual_seed(1)
    a = build("wrn28_2").state_dict()
    torch.manual_seed(1)
    b = build("wrn28_2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_channels_one() -> None:
    model = create_model("preactresnet18", 10, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    # in_channels is taken from input_shape when not given
    model = create_model("wrn28_2", 10, input_shape=(1, 16, 16))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", ["preactresnet18", "wrn28_2", "pyramidnet110_48", "cnn28"])
def test_image_families_take_one_channel_28x28(name: str) -> None:
    """Fashion-MNIST/MNIST/KMNIST inputs: in_channels comes from input_shape (1, 28, 28)."""
    model = create_model(name, 10, input_shape=(1, 28, 28)).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_cnn28_sizes_its_linear_layer_from_the_input() -> None:
    assert create_model("cnn28", 10, input_shape=(3, 32, 32))(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels"):
        create_model("cnn28", 10, in_channels=3, input_shape=(1, 28, 28))


def test_small_models_accept_their_datasets_shapes() -> None:
    spiral = create_model("mlp", 2, input_shape=(2,), hidden=(32, 32, 32))
    assert spiral(torch.randn(5, 2)).shape == (5, 2)
    digits = create_model("mlp", 10, input_shape=(1, 8, 8))
    assert digits(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    cnn = create_model("cnn1d", 10)  # in_channels defaults to 1 for cnn1d
    assert cnn(torch.randn(5, 40)).shape == cnn(torch.randn(5, 1, 40)).shape == (5, 10)
    assert create_model("cnn1d", 10, input_shape=(60,))(torch.randn(3, 60)).shape == (3, 10)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet9000", 10)
    message = str(err.value)
    assert "resnet9000" in message
    assert all(name in message for name in MODELS)
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vgg16", {"hidden": (10,)}, "'hidden'"),
        ("mlp", {"width": 3, "input_shape": (2,)}, "'width'"),
        ("mlp", {}, "input_shape"),
        ("mlp", {"input_shape": (2,), "hidden": (0,)}, "hidden"),
        ("vgg16", {"dropout": 1.0}, "dropout"),
        ("vgg16", {"dropout": -0.1}, "dropout"),
        ("vgg16", {"in_channels": 0}, "in_channels"),
        ("vgg16", {"input_shape": (3, 8, 8)}, "too small"),
        ("vgg16", {"input_shape": (32, 32)}, "input_shape"),
        ("preactresnet18", {"in_channels": 3, "input_shape": (1, 32, 32)}, "in_channels=3"),
        ("cnn1d", {"input_shape": (1, 1, 40)}, "input_shape"),
        ("cnn1d", {"input_shape": (2,)}, "too short"),
    ],
)
def test_bad_arguments_name_the_argument(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(name, 10, **kwargs)


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", 0, input_shape=(2,))
