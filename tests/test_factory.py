"""flatmin.create_optimizer: the method registry, timm-style parameter groups, equality with a
hand-built optimizer."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import make_closure
from torch import nn

import flatmin
from flatmin.errors import UnknownNameError
from flatmin.optim import AMP, RMP, SAM, OnePassAMP, ReuseAMP, SubBatchAMP
from flatmin.optim.factory import names, param_groups


class Net(nn.Module):
    """Conv + BN + LayerNorm + Linear, and a frozen parameter that no group may hold."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean(-1)
        return self.fc(torch.tanh(self.ln(h)))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 2, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("name, cls, check", [
    ("amp", AMP, lambda o: type(o) is AMP and o.param_groups[0]["epsilon"] == 0.2),
    ("amp-onepass", OnePassAMP, lambda o: True),
    ("amp-reuse", ReuseAMP, lambda o: o.reuse_every == 3),
    ("amp-subbatch", SubBatchAMP, lambda o: o.ascent_fraction == 0.5),
    ("sam", SAM, lambda o: not o.param_groups[0]["adaptive"]),
    ("asam", SAM, lambda o: o.param_groups[0]["adaptive"]),
    ("rmp", RMP, lambda o: o.param_groups[0]["radius"] == 0.1),
    ("erm", torch.optim.AdamW, lambda o: True),
    ("none", torch.optim.AdamW, lambda o: True),
])
def test_every_name_builds_its_class_around_the_base(name, cls, check):
    kw = {"amp": {"epsilon": 0.2}, "amp-reuse": {"reuse_every": 3}, "amp-subbatch": {"ascent_fraction": 0.5},
          "rmp": {"radius": 0.1}}.get(name, {})
    opt = flatmin.create_optimizer(Net(), name, base="adamw", lr=1e-3, weight_decay=0.05, **kw)
    assert isinstance(opt, cls) and check(opt)
    inner = getattr(opt, "base_optimizer", opt)
    assert isinstance(inner, torch.optim.AdamW) and inner.param_groups[0]["lr"] == 1e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_biases_and_norm_weights_are_exempt_from_weight_decay():
    net = Net()
    decay, exempt = param_groups(net, 0.1)
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    assert {id(p) for p in exempt["params"]} == {id(p) for p in (
        net.conv.bias, net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias, net.fc.bias)}
    (everything,) = param_groups(net, 0.1, no_decay_bias_and_norm=False)
    assert len(everything["params"]) == 8 and everything["weight_decay"] == 0.1  # frozen one left out
    plain = param_groups(net.parameters(), 0.1)  # no modules: the ndim rule alone
    assert [len(g["params"]) for g in plain] == [2, 6]
    mine = [{"params": [net.fc.weight], "lr": 0.5}]
    assert param_groups(mine, 0.1) == mine


def test_no_weight_decay_hook_is_honoured():
    net = Net()
    net.no_weight_decay = lambda: {"fc.weight"}
    decay, _ = param_groups(net, 0.1)
    assert [id(p) for p in decay["params"]] == [id(net.conv.weight)]


def test_weight_decay_reaches_only_the_decayed_group():
    """Zero loss gradient, plain SGD: decayed weights shrink by lr·wd, exempt ones do not move."""
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = flatmin.create_optimizer(net, "erm", base="sgd", lr=0.5, weight_decay=0.1, momentum=0.0)
    assert not opt.param_groups[0]["nesterov"]  # momentum=0 turns the sgd preset's Nesterov off
    (0 * net(batch()[0]).sum()).backward()
    opt.step()
    for n, p in net.named_parameters():
        expected = before[n] * (1 - 0.05) if n in ("conv.weight", "fc.weight") else before[n]
        assert torch.allclose(p, expected), n


def test_amp_from_the_factory_equals_amp_built_by_hand():
    """Same groups, same kwargs: three closure steps give identical parameters."""
    nets = [Net(), Net()]
    a = flatmin.create_optimizer(nets[0], "amp", base="sgd", lr=0.1, weight_decay=5e-3, epsilon=0.3,
                                 inner_lr=0.5)
    groups = [{"params": [nets[1].conv.weight, nets[1].fc.weight], "weight_decay": 5e-3},
              {"params": [p for n, p in nets[1].named_parameters()
                          if n not in ("conv.weight", "fc.weight", "frozen")], "weight_decay": 0.0}]
    b = AMP(groups, lr=0.1, epsilon=0.3, inner_lr=0.5, base_optimizer=torch.optim.SGD, momentum=0.9,
            nesterov=True, weight_decay=5e-3)
    for step in range(3):
        x, y = batch(step)
        for net, opt in zip(nets, (a, b)):
            opt.step(make_closure(net, opt, x, y))
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(nets[0].fc.weight, Net().fc.weight)  # it did train


def test_any_optimizer_class_as_base_and_errors_list_the_valid_names():
    opt = flatmin.create_optimizer(Net(), "sam", base=torch.optim.RMSprop, lr=0.01, rho=0.3)
    assert isinstance(opt.base_optimizer, torch.optim.RMSprop) and opt.param_groups[0]["rho"] == 0.3
    with pytest.raises(UnknownNameError, match="optimizer 'lookahead'; valid optimizers: amp, amp-onepass"):
        flatmin.create_optimizer(Net(), "lookahead")
    with pytest.raises(UnknownNameError, match="valid base optimizers: adam, adamw, sgd"):
        flatmin.create_optimizer(Net(), "amp", base="lion")
    with pytest.raises(TypeError, match="base must be one of"):
        flatmin.create_optimizer(Net(), "amp", base=3)
    with pytest.raises(ValueError, match="rho"):
        flatmin.create_optimizer(Net(), "sam", lr=0.1, rho=-1.0)
    assert set(names()) >= {"amp", "sam", "asam", "rmp", "amp-onepass", "amp-reuse", "amp-subbatch", "erm",
                            "gsam", "fsam", "looksam", "wsam", "bsam", "esam", "msam"}
    assert isinstance(flatmin.create_optimizer(Net(), "gsam", lr=0.1, alpha=0.2), flatmin.GSAM)
    with pytest.raises(ValueError, match="num_data"):
        flatmin.create_optimizer(Net(), "bsam", lr=0.1)
