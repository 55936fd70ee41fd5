"""THE list of perturbation rules: each rule declares itself here, once, in its own file.

A rule's `RuleInfo` names it, points at its class, lists its hyper-parameters (the keyword, the
value rule, the class default, the trainer's config field and default, a help line), cites the
paper and the authors' code, and says what a step costs and keeps and what it needs from a caller.
Everything else is derived from this list, and only from it:

- the public classes (`flatmin.AMP`, `flatmin.GSAM`, …) and `create_optimizer`'s names;
- the trainer's ``--method`` choices, its rule flags (``--gsam-alpha``) and the config's rule fields;
- the validation of every value (the classes' ``validate_group`` call `check_group` with the same
  `Hyper` objects the CLI parses with), compare's ``method:key=value`` specs and the docs table.

A rule file ends with ``register(RuleInfo(...))``; `rules()` imports every module of
`flatmin.optim.rules` once, so a new file is found without editing any list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flatmin.checks import Choice, Flag, Number
from flatmin.errors import UnknownNameError

Rule = Number | Choice | Flag
_MISSING: Any = object()


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter: the class keyword, its value rule, defaults, config field and help."""

    name: str  # the keyword the class takes (alpha)
    rule: Rule  # the one rule that validates it, wherever the value comes from
    default: Any  # the class default (None: required, or filled by the class)
    help: str
    field: str | None = None  # the trainer's config field (gsam_alpha); None: not a trainer option
    config_default: Any = _MISSING  # the config's default when it is not the class default (None: a preset)
    used_with: tuple[str, tuple[Any, ...]] | None = None  # read only when another hyper takes these values
    required: bool = False  # create_optimizer needs it (bSAM's num_data)

    @property
    def trainer_default(self) -> Any:
        """What a TrainConfig holds before presets: the config default, else the class default."""
        return self.default if self.config_default is _MISSING else self.config_default

    @property
    def flag(self) -> str | None:
        """The command-line flag of its config field."""
        return None if self.field is None else "--" + self.field.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value by its rule (a ConfigError, which is a ValueError, names the keyword)."""
        if value is None and not self.required and self.default is None:
            return value
        return self.rule.check(value, self.name)


@dataclass(frozen=True)
class RuleInfo:
    """Everything flatmin knows about one rule, in one place."""

    name: str  # the trainer's --method and create_optimizer's name
    cls: type  # the optimizer class (public under its own name)
    summary: str  # one line for the docs table
    paper: str
    code: str  # the authors' code ("" when they released none)
    hypers: tuple[Hyper, ...] = ()
    passes: str = "2"  # forward/backward passes per step
    kept: str = "—"  # memory kept between steps beyond θ's copy, in parameter sizes
    needs: str = ""  # what a caller must provide beyond gradients (sub-batches, per-example losses)
    sharded: bool = True  # runs under FSDP (False: the trainer refuses --fsdp with it)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # class keywords this name fixes (asam: adaptive)
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # more names, each fixing keywords
    own_update: bool = False  # brings its own update (bSAM): no base optimizer, no SGD defaults
    sgd_defaults: Mapping[str, Any] = field(default_factory=dict)  # the authors' SGD where it differs from
    # the protocol's (MSAM: nesterov=False): the trainer's default and create_optimizer's with base="sgd"
    unused_params: Callable[[Mapping[str, Any]], bool] | None = None  # some tensors get no gradient in a
    # pass with these keywords (ESAM's β < 1): DDP must then look for unused parameters
    plain_in_factory: bool = False  # create_optimizer hands back the base optimizer itself (erm)
    make: Callable[..., Any] | None = None  # (params, base, **kw) when not ``cls(params, base, **kw)``
    from_config: Callable[[Any], dict[str, Any]] | None = None  # trainer: keywords from the config (a seed)
    protocol: Callable[[Any], dict[str, Any]] | None = None  # trainer: own-update keywords from the protocol
    recipe: Mapping[str, Any] = field(default_factory=dict)  # trainer: the authors' protocol fields (lr,
    # lr_schedule, warmup_epochs), taken where the user left the field unset, before the dataset's defaults
    neutral: Mapping[str, Any] | None = field(default_factory=dict)  # ≡ the base optimizer (None: none)
    examples: tuple[Mapping[str, Any], ...] = ({},)  # settings the conformance matrix runs (test sizes)
    order: int = 50  # where it stands in lists and tables (the paper's rules first)

    def hyper(self, name: str) -> Hyper:
        """A hyper-parameter by its keyword."""
        for h in self.hypers:
            if h.name == name:
                return h
        raise UnknownNameError(f"{self.name} hyper-parameter", name, [h.name for h in self.hypers])

    @property
    def trainer_hypers(self) -> tuple[Hyper, ...]:
        """The hyper-parameters the trainer exposes (those with a config field)."""
        return tuple(h for h in self.hypers if h.field is not None)

    def fields_for(self, values: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The config fields a run reads (a variant may read fewer: AMP's reuse_every only with reuse)."""
        out = []
        for h in self.trainer_hypers:
            if h.used_with is not None and values is not None:
                other, allowed = h.used_with
                if values.get(self.hyper(other).field) not in allowed:
                    continue
            out.append(h.field)
        return tuple(out)

    def build(self, params: Iterable, base: Any, **kwargs: Any) -> Any:
        """The optimizer: ``make`` or the class, with this name's fixed keywords."""
        kwargs = {**kwargs, **self.fixed}
        if self.make is not None:
            return self.make(params, base, **kwargs)
        return self.cls(params, base, **kwargs)


_RULES: dict[str, RuleInfo] = {}
_LOADED = False


def register(info: RuleInfo) -> RuleInfo:
    """Declare a rule (at the end of its own file); a name taken twice is a bug, said at import."""
    for name in (info.name, *info.aliases):
        if name in _RULES and _RULES[name].cls is not info.cls:
            raise RuntimeError(f"rule name {name!r} registered twice ({_RULES[name].cls} and {info.cls})")
    _RULES[info.name] = info
    for h in info.trainer_hypers:  # a shared config field (rho, ball) must mean one thing
        for other in _RULES.values():
            for o in other.trainer_hypers:
                if o.field == h.field and (o.rule != h.rule or o.trainer_default != h.trainer_default):
                    raise RuntimeError(f"config field {h.field!r}: {info.name} and {other.name} disagree "
                                       "on its rule or default")
    return info


def rules() -> dict[str, RuleInfo]:
    """Every registered rule by name (importing every module of `flatmin.optim.rules` once)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        package = importlib.import_module("flatmin.optim.rules")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
        ordered = sorted(_RULES.values(), key=lambda info: (info.order, info.name))
        _RULES.clear()
        _RULES.update((info.name, info) for info in ordered)
    return dict(_RULES)


def names() -> dict[str, tuple[RuleInfo, dict[str, Any]]]:
    """Every name create_optimizer accepts: a rule's own, or an alias with the keywords it fixes."""
    out: dict[str, tuple[RuleInfo, dict[str, Any]]] = {}
    for info in rules().values():
        out[info.name] = (info, {})
        for alias, fixed in info.aliases.items():
            out[alias] = (info, dict(fixed))
    return out


def get(name: str) -> RuleInfo:
    """A rule by its name (not an alias); an unknown name lists the valid ones."""
    found = rules()
    if name not in found:
        raise UnknownNameError("rule", name, list(found))
    return found[name]


def public_classes() -> dict[str, type]:
    """The classes `flatmin` exports, by class name (one entry even when two rules share a class)."""
    return {info.cls.__name__: info.cls for info in rules().values()}


def check_group(hypers: Iterable[Hyper], group: Mapping[str, Any]) -> None:
    """Check every hyper-parameter present in a parameter group by its rule (one source of validation)."""
    for h in hypers:
        if h.name in group:
            h.check(group[h.name])


def config_fields() -> dict[str, Hyper]:
    """Every trainer config field a rule declares, by field (the first declaration; shared ones agree)."""
    out: dict[str, Hyper] = {}
    for info in rules().values():
        for h in info.trainer_hypers:
            out.setdefault(h.field, h)
    return out


def field_users() -> dict[str, list[str]]:
    """Which rules read each config field (the help of a shared flag says so)."""
    out: dict[str, list[str]] = {}
    for info in rules().values():
        for h in info.trainer_hypers:
            out.setdefault(h.field, []).append(info.name)
    return out


def resolve_key(method: str, key: str) -> str | None:
    """A spec's key for a method (``gsam:alpha=0.2``): the config field of that rule's hyper-parameter."""
    info = rules().get(method)
    if info is None:
        return None
    for h in info.trainer_hypers:
        if key in (h.name, h.field):
            return h.field
    return None


def table() -> str:
    """The docs' table of rules, as markdown (docs/rules.md; a test holds them equal)."""
    rows = ["| rule | class | what it does | passes/step | kept beyond θ | hyper-parameters: default "
            "(trainer flag) | paper · authors' code | needs |", "|---|---|---|---|---|---|---|---|"]
    for info in rules().values():
        hypers = "; ".join(f"`{h.name}={h.default!r}`" + (f" (`{h.flag}`)" if h.flag else "")
                           for h in info.hypers) or "—"
        needs = [info.needs] if info.needs else []
        needs += [] if info.sharded else ["not under FSDP"]
        source = f"{info.paper} · {info.code or '—'}"
        rows.append(f"| `{info.name}` | `{info.cls.__name__}` | {info.summary} | {info.passes} | "
                    f"{info.kept} | {hypers} | {source} | {'; '.join(needs) or '—'} |")
    return "\n".join(rows)


DOCS_COMMAND = "python -m flatmin.optim > docs/rules.md"


def docs() -> str:
    """docs/rules.md: every registered rule, generated from this registry (tests/test_registry.py holds
    the file equal to it; after registering a rule, regenerate it with `DOCS_COMMAND`)."""
    return (f"# The rules\n\nGenerated from `flatmin.optim.registry` by `{DOCS_COMMAND}`; do not edit.\n"
            "Each rule's file in `src/flatmin/optim/rules/` says where it follows its authors and where it "
            "differs;\n[family.md](family.md) has the benchmark. Every rule keeps θ's copy (1× the "
            "parameters) besides what the table lists.\n\n" + table() + "\n")

