"""The registry is the one source: its docs table, its value rules (the classes and the command line
reject the same values), its names everywhere. Generated over every registered rule."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import flatmin
from flatmin.checks import Choice, Flag, Number
from flatmin.cli.options import OPTIONS
from flatmin.optim import registry
from flatmin.train import METHODS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HYPERS = [(info, h) for info in registry.rules().values() for h in info.hypers]


def test_docs_table_is_the_registry():
    text = (ROOT / "docs" / "rules.md").read_text()
    assert text == registry.docs(), f"docs/rules.md is stale: regenerate it with `{registry.DOCS_COMMAND}`"


def bad_value(rule) -> object:
    """A value just outside a rule."""
    if isinstance(rule, Choice):
        return "bogus"
    if isinstance(rule, Flag):
        return "yes"
    if rule.lo is not None:
        return rule.lo if rule.lo_open else rule.lo - 1
    return float("nan")


@pytest.mark.parametrize("info, h", HYPERS, ids=lambda x: getattr(x, "name", None))
def test_a_value_outside_the_rule_is_refused_by_the_class_and_the_flag(info, h):
    """One rule per value: the class refuses it naming the keyword, and so does the trainer's flag."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    kwargs = {"num_data": 10} if info.own_update else {}
    kwargs[h.name] = bad_value(h.rule)
    with pytest.raises(ValueError, match=h.name):
        info.build(params, torch.optim.SGD, lr=0.1, **kwargs)
    if h.flag is not None and not isinstance(h.rule, Flag):
        _, typ, _ = OPTIONS[h.flag]
        with pytest.raises(argparse.ArgumentTypeError):
            typ(str(bad_value(h.rule)))


def test_every_rule_is_public_a_factory_name_and_a_trainer_method():
    for name, info in registry.rules().items():
        assert getattr(flatmin, info.cls.__name__) is info.cls
        assert name in registry.names()
        assert name in METHODS
        for h in info.trainer_hypers:
            assert OPTIONS[h.flag][0] == h.field
            assert getattr(TrainConfig(), h.field) == h.trainer_default


def test_a_shared_field_means_one_thing():
    """rho, ball: every rule that reads a config field gives it the same rule and default."""
    seen: dict[str, registry.Hyper] = {}
    for _, h in HYPERS:
        if h.field is None:
            continue
        first = seen.setdefault(h.field, h)
        assert (first.rule, first.trainer_default) == (h.rule, h.trainer_default), h.field


def test_a_name_taken_twice_is_refused():
    info = registry.get("sam")
    clash = registry.RuleInfo("sam", type("Other", (), {}), "", "", "")
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register(clash)
    assert registry.get("sam") is info


def test_compare_specs_take_a_rules_own_keywords():
    from flatmin.experiments.compare import parse_specs

    (gsam, looksam) = parse_specs("gsam:alpha=0.2,looksam:alpha=0.5,k=3")
    assert gsam.fields == {"gsam_alpha": 0.2}
    assert looksam.fields == {"looksam_alpha": 0.5, "looksam_k": 3}


def test_a_number_rule_names_its_range():
    assert Number(float, 0, 1, hi_open=True).describe() == "a finite number in [0, 1)"
