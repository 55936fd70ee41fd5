"""torch.compile: a compiled model trains with AMP/SAM, restores θ exactly, and matches eager."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F

from flatmin.models import create_model
from flatmin.optim import AMP, SAM
from flatmin.train import TrainConfig, train

# 180 training points in batches of 20: one batch shape, so one compiled graph for the whole run
SPIRAL = dict(dataset="spiral", epochs=3, batch_size=20, lr=0.1, dataset_options={"n_samples": 200})


@pytest.fixture(scope="module", autouse=True)
def compiler() -> None:
    """Skip (saying why) where inductor cannot build CPU kernels."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform")
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler; none found")
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as err:  # noqa: BLE001 - any failure to build means: not available here
        pytest.skip(f"torch.compile does not work here ({type(err).__name__}: {err})")


def optimizer(method: str, params) -> AMP | SAM:
    """The two perturbation optimizers, as the trainer builds them."""
    if method == "amp":
        return AMP(params, lr=0.1, epsilon=0.5, inner_lr=1.0, momentum=0.9)
    return SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_compiled_steps_match_eager_and_restore_theta(method):
    torch.manual_seed(0)
    eager = create_model("mlp", num_classes=2, input_shape=(2,))  # the trainer's spiral model
    twin = create_model("mlp", num_classes=2, input_shape=(2,))
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin)
    opts = optimizer(method, eager.parameters()), optimizer(method, twin.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(20, 2, generator=g), torch.randint(0, 2, (20,), generator=g)
        for net, opt in zip((eager, compiled), opts):

            def closure(net=net, opt=opt, x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        assert not opts[1].perturbed
    for a, b in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fused kernels round differently


@pytest.mark.parametrize("method", ["amp", "sam"])
def test_trainer_with_compile_matches_eager(method):
    eager = train(TrainConfig(method=method, **SPIRAL), progress=False)
    compiled = train(TrainConfig(method=method, compile=True, **SPIRAL), progress=False)
    assert compiled["config"]["compile"] is True
    for split in ("train", "val", "test"):
        assert abs(compiled[split]["nll"] - eager[split]["nll"]) < 1e-4, split
        assert compiled[split]["error"] == eager[split]["error"], split
