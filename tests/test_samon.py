"""SAM-ON against a float64 loop written from the authors' algorithm (mueller-mp/SAM-ON, sam_on.py:
``SAM_ON.ascent_step``, ``ASAM_ON.ascent_step`` with ``elementwise``, ``normalize_bias``, η = 0, p = 2,
and ``descent_step``): the normalisation parameters — picked by name, as the authors do — move by
ρ·T²g/‖Tg‖ with the norm over them alone, θ comes back by copy, and SGD steps every parameter with the
gradient taken at the perturbed point; plus its exact reductions (every tensor perturbed ≡ SAM/ASAM,
ρ = 0 ≡ the base optimizer)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import closure_steps
from torch import nn
from torch.nn import functional as F

import flatmin
from flatmin import SAM, SAMON
from flatmin.errors import FlatminWarning
from flatmin.optim import Pass, drive

SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


class Net(nn.Module):
    """An MLP with a BatchNorm and a LayerNorm, named so that the authors' name rule finds them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn = nn.Linear(5, 8), nn.BatchNorm1d(8)
        self.fc2, self.norm = nn.Linear(8, 6), nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.fc2(torch.tanh(self.bn(self.fc1(x)))))))


def net() -> Net:
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():  # scales and shifts away from 1 and 0, so that ASAM's T = |θ| is not trivial
        for m in (model.bn, model.norm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
            for _ in range(n)]


def authors_loop(model: nn.Module, data, rho: float, adaptive: bool = False, select=None) -> None:
    """Per batch: g at θ; for the selected tensors (the authors: 'norm' or 'bn' in the name) T = |θ| (ASAM-ON,
    η = 0) or I, e = ρ·T²g/(‖Tg‖ + 1e-12) with the norm over them alone; the gradient at θ + e (BatchNorm in
    train mode both times); the perturbed tensors back by copy; SGD steps every tensor."""
    select = select or (lambda name, p: "norm" in name or "bn" in name)
    named = list(model.named_parameters())
    sgd = torch.optim.SGD([p for _, p in named], **SGD)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            chosen = [p for n, p in named if select(n, p)]
            scaled = [p.grad * p.abs() if adaptive else p.grad for p in chosen]
            norm = torch.linalg.vector_norm(torch.stack([s.norm() for s in scaled]))
            theta = [p.detach().clone() for p in chosen]
            for p, s in zip(chosen, scaled):
                p.add_((s * p.abs() if adaptive else s) * (rho / (norm + 1e-12)))
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, t in zip(chosen, theta):
                p.copy_(t)
        sgd.step()


def run(opt: torch.optim.Optimizer, model: nn.Module, data) -> None:
    """``opt.step(closure)`` over the batches."""
    closure_steps(opt, model, data)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm's running statistics)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, p), q in zip(state(a).items(), state(b).values()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


def test_matches_the_authors_sam_on_and_asam_on():
    data = batches(6)
    for adaptive, rho in ((False, 0.1), (True, 0.5)):
        ours, theirs = net(), net()
        run(SAMON(SAMON.norm_groups(ours), torch.optim.SGD, rho=rho, adaptive=adaptive, **SGD), ours, data)
        authors_loop(theirs, data, rho, adaptive)
        assert_same(ours, theirs, atol=1e-14)
        assert not torch.equal(ours.fc1.weight, net().fc1.weight)  # every tensor is updated


def test_module_types_find_the_tensors_the_authors_names_find():
    model = net()
    norm, rest = SAMON.norm_groups(model)
    assert norm["perturb"] and not rest["perturb"]
    by_name = [p for n, p in model.named_parameters() if "norm" in n or "bn" in n]
    assert [id(p) for p in norm["params"]] == [id(p) for p in by_name]


def test_only_the_normalisation_layers_move_and_by_rho():
    model, (x, y) = net(), batches(1)[0]
    opt = SAMON(SAMON.norm_groups(model), torch.optim.SGD, rho=0.1, **SGD)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"bn.weight", "bn.bias", "norm.weight", "norm.bias"}
    with torch.no_grad():
        assert abs(float(opt.perturbation_norm()) - 0.1) < 1e-6  # ‖e‖ = ρ over N (perturbation_norm: float32)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def test_unmarked_groups_perturb_the_one_dimensional_tensors():
    """The documented default when nothing says which tensors are normalisation parameters."""
    data = batches(4)
    ours, theirs = net(), net()
    run(SAMON(ours.parameters(), torch.optim.SGD, rho=0.1, **SGD), ours, data)
    authors_loop(theirs, data, 0.1, select=lambda name, p: p.ndim <= 1)
    assert_same(ours, theirs, atol=1e-14)


def test_a_bound_model_gives_the_authors_tensors_from_plain_parameters():
    """`flatmin train` and `create_optimizer` hand over plain parameters and bind the model: N is then its
    normalisation layers (the authors' choice), not the 1-D tensors (which include the linear biases)."""
    data = batches(4)
    ours, theirs = net(), net()
    opt = SAMON(ours.parameters(), torch.optim.SGD, rho=0.1, **SGD)
    opt.bind_model(ours)
    run(opt, ours, data)
    authors_loop(theirs, data, 0.1)
    assert_same(ours, theirs, atol=1e-14)
    model = net()
    made = flatmin.create_optimizer(model, "samon", lr=0.1)  # the factory binds the model it was given
    assert made._norms == {id(p) for name, p in model.named_parameters() if "norm" in name or "bn" in name}


def test_a_bound_model_without_normalisation_layers_is_said_once():
    """SAM-ON on an MLP with no norm layer is the base optimizer at twice the cost: a warning says so."""
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.warns(FlatminWarning, match="Sequential has no normalisation layer"):
        flatmin.create_optimizer(mlp, "samon", lr=0.1)


def test_perturbing_every_tensor_is_sam_and_asam_bit_for_bit():
    data = batches(4)
    for adaptive in (False, True):
        ours, sam = net(), net()
        groups = [{**g, "perturb": True} for g in SAMON.norm_groups(ours)]
        run(SAMON(groups, torch.optim.SGD, rho=0.1, adaptive=adaptive, **SGD), ours, data)
        run(SAM([{"params": g["params"]} for g in SAMON.norm_groups(sam)], torch.optim.SGD, rho=0.1,
                adaptive=adaptive, **SGD), sam, data)
        assert_same(ours, sam)
        ours, sam = net(), net()  # the class keyword says it for every group
        opt = SAMON(ours.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, perturb=True, **SGD)
        run(opt, ours, data)
        run(SAM(sam.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, **SGD), sam, data)
        assert_same(ours, sam)


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    """Through the driver with the model: BatchNorm statistics move in the first pass only, as in SGD's."""
    data = batches(4)
    ours, base = net(), net()
    opt = SAMON(SAMON.norm_groups(ours), torch.optim.SGD, rho=0.0, **SGD)
    for x, y in data:
        def grad_pass(p: Pass, x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(ours(x), y)
            loss.backward()
            return loss
        drive(opt, grad_pass, model=ours)
    sgd = torch.optim.SGD(base.parameters(), **SGD)
    for x, y in data:
        sgd.zero_grad()
        F.cross_entropy(base(x), y).backward()
        sgd.step()
    assert_same(ours, base)


def test_registered_everywhere_without_another_edit():
    """The registry made it public, a create_optimizer name and a trainer method."""
    from flatmin.train import METHODS

    opt = flatmin.create_optimizer(net(), "samon", lr=0.1, rho=0.5, adaptive=True)
    assert isinstance(opt, SAMON) and all(g["rho"] == 0.5 and g["adaptive"] for g in opt.param_groups)
    assert "samon" in METHODS and flatmin.SAMON is SAMON
