"""The two-call protocol is a state machine that refuses misuse, and state dicts know their kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import fixed_batch, tiny_model
from torch import nn
from torch.nn import functional as F

from flatmin import AMP, RMP, SAM
from flatmin.optim import ERM, build_amp

SIZES = (4, 5, 3)
X, Y = fixed_batch(8)


def backward(model: nn.Module, opt) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), Y).backward()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_perturb_too_many_is_refused_and_names_the_fix():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.1)
    backward(model, opt)
    opt.perturb()
    backward(model, opt)
    with pytest.raises(RuntimeError, match=r"perturb\(\) called 2 times.*restore_and_step"):
        opt.perturb()


def test_sam_first_step_twice_is_refused():
    model = tiny_model(sizes=SIZES)
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    backward(model, opt)
    opt.first_step(zero_grad=True)
    at_w_plus_e = snapshot(model)
    backward(model, opt)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), at_w_plus_e))  # nothing added


@pytest.mark.parametrize("make, call", [
    (lambda p: SAM(p, lr=0.1), lambda o: o.second_step()),
    (lambda p: AMP(p, lr=0.1), lambda o: o.restore_and_step()),
    (lambda p: build_amp(p, "subbatch", lr=0.1), lambda o: o.restore_and_step()),
])
def test_an_update_with_no_perturbation_is_refused(make, call):
    model = tiny_model(sizes=SIZES)
    opt = make(model.parameters())
    backward(model, opt)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="no step under way"):
        call(opt)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))


def test_an_update_before_every_ascent_pass_is_refused():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1, inner_iter=2)
    backward(model, opt)
    opt.perturb()
    backward(model, opt)
    with pytest.raises(RuntimeError, match="after 1 of 2 ascent"):
        opt.restore_and_step()


def test_rules_without_ascent_need_no_perturb_but_a_begun_step():
    model = tiny_model(sizes=SIZES)
    for opt in (ERM(model.parameters(), lr=0.1), RMP(model.parameters(), lr=0.1)):
        with pytest.raises(RuntimeError, match="begin_step"):
            backward(model, opt)
            opt.restore_and_step()
        opt.begin_step()
        with pytest.raises(RuntimeError, match="already under way"):
            opt.begin_step()
        backward(model, opt)
        opt.restore_and_step()


def test_state_dict_in_mid_step_is_refused():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1)
    backward(model, opt)
    opt.perturb()
    with pytest.raises(RuntimeError, match="middle of a step"):
        opt.state_dict()


def trained_state(make) -> dict:
    model = tiny_model(sizes=SIZES)
    opt = make(model.parameters())
    opt.step(lambda: (backward(model, opt), F.cross_entropy(model(X), Y))[1])
    return opt.state_dict()


@pytest.mark.parametrize("saver, loader, words", [
    (lambda p: AMP(p, lr=0.1), lambda p: SAM(p, lr=0.1), "saved by AMP/SGD, not SAM/SGD"),
    (lambda p: SAM(p, lr=0.1), lambda p: AMP(p, lr=0.1), "saved by SAM/SGD, not AMP/SGD"),
    (lambda p: AMP(p, lr=0.1), lambda p: AMP(p, lr=0.1, base_optimizer=torch.optim.Adam), "not AMP/Adam"),
    (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: AMP(p, lr=0.1), "no ball, epsilon.*not saved by AMP"),
])
def test_a_foreign_state_dict_is_refused(saver, loader, words):
    state = trained_state(saver)
    with pytest.raises(ValueError, match=words):
        loader(tiny_model(sizes=SIZES).parameters()).load_state_dict(state)


def test_older_flatmin_state_dicts_and_plain_states_into_erm_still_load():
    state = trained_state(lambda p: AMP(p, lr=0.1, epsilon=0.2))
    state.pop("perturbation")  # what flatmin 0.1 saved for exact AMP
    opt = AMP(tiny_model(sizes=SIZES).parameters(), lr=0.1)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["epsilon"] == 0.2
    ERM(tiny_model(sizes=SIZES).parameters(), lr=0.1).load_state_dict(
        trained_state(lambda p: torch.optim.SGD(p, lr=0.1)))


def test_a_closure_returning_none_is_named():
    model = tiny_model(sizes=SIZES)
    opt = AMP(model.parameters(), lr=0.1)

    def my_closure():
        backward(model, opt)

    with pytest.raises(TypeError, match="my_closure returned None; it must return the loss"):
        opt.step(my_closure)
    assert not opt.perturbed


# --- the state machine, by property -------------------------------------------------------------

CALLS = ("begin", "perturb", "finish", "restore", "state_dict")


class Model:
    """What the protocol allows, written independently of the optimizer."""

    def __init__(self, passes: int) -> None:
        self.passes, self.begun, self.done = passes, False, 0

    def allows(self, call: str) -> bool:
        if call == "begin":
            return not self.begun
        if call == "perturb":
            return self.done < self.passes
        if call == "finish":
            return self.begun and self.done == self.passes
        if call == "state_dict":
            return not self.begun
        return True

    def apply(self, call: str) -> None:
        if call == "begin":
            self.begun, self.done = True, 0
        elif call == "perturb":
            self.begun, self.done = True, self.done + 1
        elif call in ("finish", "restore"):
            self.begun, self.done = False, 0


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["amp1", "amp2", "sam", "rmp", "erm"]), st.lists(st.sampled_from(CALLS), max_size=12))
def test_the_protocol_is_the_state_machine(rule, calls):
    model = tiny_model(sizes=SIZES)
    make = {"amp1": lambda p: AMP(p, lr=0.1), "amp2": lambda p: AMP(p, lr=0.1, inner_iter=2),
            "sam": lambda p: SAM(p, lr=0.1), "rmp": lambda p: RMP(p, lr=0.1),
            "erm": lambda p: ERM(p, lr=0.1)}[rule]
    opt = make(model.parameters())
    expected = Model(opt.ascent_passes())
    theta = snapshot(model)
    for call in calls:
        backward(model, opt)
        if rule == "rmp" and call == "perturb":  # RMP's perturb() is its begin_step()
            call = "begin"
        allowed = expected.allows(call)
        before = snapshot(model)
        fn = {"begin": opt.begin_step if rule != "rmp" else opt.perturb, "perturb": opt.perturb,
              "finish": opt.restore_and_step,
              "restore": opt.restore, "state_dict": opt.state_dict}[call]
        if allowed:
            fn()
            expected.apply(call)
            if call == "finish":
                theta = snapshot(model)
            if call == "restore":
                assert all(torch.equal(a, b) for a, b in zip(snapshot(model), theta))
        else:
            with pytest.raises(RuntimeError):
                fn()
            assert all(torch.equal(a, b) for a, b in zip(snapshot(model), before))
    opt.restore()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), theta))


@pytest.mark.parametrize("name", ["gsam", "fsam", "wsam", "esam"])
def test_the_family_refuses_a_second_first_step_too(name):
    from flatmin.optim import create_optimizer

    model = tiny_model(sizes=SIZES)
    opt = create_optimizer(model, name, lr=0.1)
    backward(model, opt)
    opt.first_step(zero_grad=True)
    backward(model, opt)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()
