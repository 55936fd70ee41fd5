"""A run's configuration: plain values, every one overridable, defaults from the paper.

Fields left ``None`` are filled by `resolve` from, in order: the paper presets for the model and
augmentation (§5.1–5.2), the dataset's own defaults (CPU-sized for the embedded datasets), and
the method's defaults (§5.1: label smoothing 0.2, flooding 0.02, MixUp Beta(1,1), RMP r=0.1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flatmin.checks import (
    COUNT,
    FRACTION,
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SHARE,
    Choice,
    Flag,
    check_device,
)
from flatmin.errors import ConfigError
from flatmin.optim import registry

PRECISIONS = ("32", "bf16", "fp16")
LR_SCHEDULES = Choice(("step", "cosine", "constant"))
DEFAULT_LR_SCHEDULE = "step"  # the paper's: lr x lr_gamma at each milestone (50% and 75% of the epochs)


@dataclass
class _Protocol:
    """The protocol, data, Table 1's non-optimizer methods and execution: the fields no rule declares."""

    dataset: str = "mnist1d"
    model: str | None = None
    method: str = "erm"
    # protocol (paper §5.1: SGD, momentum 0.9, Nesterov, lr 0.1 ÷10 at 50% and 75%, batch 50, wd 1e-4)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool | None = None  # None: True (the paper's), or the method's authors' (msam: False)
    weight_decay: float | None = None
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs (the step schedule)
    lr_gamma: float = 0.1
    lr_schedule: str | None = None  # step (at the milestones), cosine or constant; None: the dataset's
    warmup_epochs: int | None = None  # linear warm-up epochs first; None: the method's recipe, else 0
    grad_clip: float | None = None  # the authors clip the gradient norm at 50
    accumulate: int = 1  # micro-batches per pass (gradient accumulation; the step is the same)
    # data
    augment: str = "standard"
    val_fraction: float = 0.1
    data_dir: str | None = None
    download: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)
    # methods
    dropout: float = 0.1
    label_smoothing: float = 0.2
    flood_level: float = 0.02
    mixup_alpha: float = 1.0
    adv_epsilon: float = 1.0  # FGSM step in pixel levels (of 255) of the input range
    # execution
    seed: int = 0
    device: str = "cpu"
    precision: str = "32"
    compile: bool = False
    eval_batch_size: int = 1000
    eval_every: int = 1  # evaluate val/test every k epochs and after the last (costs CPU, changes no weight)
    ddp_local_ascent: bool = False  # under DDP: per-rank ascent gradient (no all-reduce)
    tensorboard: bool = False  # also write TensorBoard events (flatmin.train.logging); not part of a result
    fsdp: bool = False  # under torchrun: shard parameters, gradients, optimizer state (FSDP2)

    def to_dict(self) -> dict[str, Any]:
        """JSON- and weights_only-safe plain values."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Protocol:
        """Inverse of `to_dict`; unknown keys are an error, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def replace(self, **changes: Any) -> _Protocol:
        """A copy with some fields changed (grids and sweeps)."""
        return dataclasses.replace(self, **changes)

    def lr_at(self, epoch: int) -> float:
        """The epoch's learning rate. After ``warmup_epochs`` epochs at lr·(e+1)/W (bSAM's authors'
        linear warm-up): step (the paper's), lr × lr_gamma at each milestone (fractions of the epochs; 50%
        and 75%); cosine, from lr down toward 0 over the epochs after the warm-up; constant, lr throughout."""
        warm = self.warmup_epochs or 0
        if epoch < warm:
            return self.lr * (epoch + 1) / warm
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * (epoch - warm) / (self.epochs - warm)))
        passed = sum(epoch >= round(m * self.epochs) for m in self.milestones)
        return self.lr * self.lr_gamma ** passed

    def lr_end(self) -> float:
        """The schedule's lowest learning rate after the warm-up, where it heads (GSAM's lr_min): step,
        lr × lr_gamma^(milestones); cosine, 0; constant, lr."""
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            return 0.0
        return self.lr * self.lr_gamma ** len(self.milestones)


def _rule_fields() -> list[tuple[str, Any, Any]]:
    """The rules' config fields (ε, ρ, gsam_alpha, ...), each with the default its registry entry gives."""
    return [(name, Any, field(default=h.trainer_default)) for name, h in registry.config_fields().items()]


# Everything that determines a run; saved with every result and checkpoint. The rules' own fields come
# from `flatmin.optim.registry` (a rule registered in its own file gets its fields here without an edit).
TrainConfig = dataclasses.make_dataclass("TrainConfig", _rule_fields(), bases=(_Protocol,))
TrainConfig.__module__, TrainConfig.__qualname__ = __name__, "TrainConfig"
TrainConfig.__doc__ = "Everything that determines a run; saved with every result and checkpoint."


# The value rules of the fields an optimizer rule owns: the registry's, one rule per value.
RULE_FIELD_RULES: dict[str, Any] = {name: h.rule for name, h in registry.config_fields().items()}
# Config field -> its value rule, wherever the value comes from: a flag (the CLI's flag table takes
# each flag's type from here), a grid file, a ``--tune`` list or a resumed configuration.
FIELD_RULES: dict[str, Any] = {
    "epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE, "momentum": FRACTION,
    "weight_decay": NONNEGATIVE, "grad_clip": POSITIVE, "accumulate": POSITIVE_INT,
    "eval_every": POSITIVE_INT, "val_fraction": FRACTION, **RULE_FIELD_RULES,
    "dropout": FRACTION, "label_smoothing": FRACTION, "flood_level": NONNEGATIVE, "mixup_alpha": POSITIVE,
    "adv_epsilon": NONNEGATIVE, "seed": COUNT, "eval_batch_size": POSITIVE_INT, "lr_gamma": SHARE,
    "lr_schedule": LR_SCHEDULES, "warmup_epochs": COUNT, "nesterov": Flag(),
}
DEFAULTS = TrainConfig().to_dict()
FIELDS = list(DEFAULTS)
# Fields holding a name or a path (the device is checked against the machine on its own).
TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                    if f.type in ("str", "str | None") and f.name != "device")


def check_field(name: str, value: Any, where: str = "") -> Any:
    """One configuration value from a file (grid, checkpoint): known field, right type, in range."""
    if name not in FIELDS:
        raise ConfigError(f"{where}unknown config field {name!r}; valid fields: {', '.join(FIELDS)}")
    default = DEFAULTS[name]
    if value is None and default is None:
        return value
    if name in FIELD_RULES:
        return FIELD_RULES[name].check(value, where + name)
    if name == "device":
        try:
            return check_device(value) if isinstance(value, str) else _wrong(name, value, "a device", where)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _wrong(name, value, "true or false", where)
    if name == "milestones":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value)
        return value if ok else _wrong(name, value, "a list of fractions in (0, 1)", where)
    if name == "dataset_options":
        return value if isinstance(value, dict) else _wrong(name, value, "a table", where)
    ok = isinstance(value, str) and value.strip()
    return value if ok else _wrong(name, value, "a non-empty string", where)


def _wrong(name: str, value: Any, what: str, where: str) -> Any:
    raise ConfigError(f"{where}{name} must be {what}, got {value!r}")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every field of a configuration by its rule, its device included, before any work."""
    for name in FIELDS:
        check_field(name, getattr(cfg, name))
    return cfg


# Paper presets for AMP (§5.1–5.2): (model, augment) -> ε, ζ; N = 1 and the authors' per-tensor ball.
PAPER_AMP = {
    ("preactresnet18", "standard"): (0.5, 1.0),
    ("vgg16", "standard"): (0.1, 0.2),
    ("wrn28_10", "standard"): (0.5, 1.0),
    ("pyramidnet164_270", "standard"): (0.5, 1.0),
    ("*", "cutout"): (0.3, 0.5),
    ("*", "autoaugment"): (0.1, 0.1),
}
PAPER_DATASETS = ("cifar10", "cifar100", "svhn", "gtsrb")
# CPU datasets: ε, ζ, ball, ρ chosen on the validation split (mnist1d: docs/experiments.md; spiral: Fig. 6).
CPU_PRESETS = {
    "mnist1d": dict(epsilon=0.1, inner_lr=0.1, ball="global", rho=0.1, asam_rho=0.1),
    "spiral": dict(epsilon=0.05, inner_lr=1.0, ball="global", rho=0.05, asam_rho=0.5),
    "digits": dict(epsilon=0.1, inner_lr=0.1, ball="global", rho=0.1, asam_rho=0.5),  # not tuned
    # IDX sets (cnn28*): untuned; ε between docs/fashion_mnist.md's --tune values, ρ the SAM/ASAM papers'
    "fashion-mnist": dict(epsilon=0.1, inner_lr=0.1, ball="global", rho=0.05, asam_rho=0.5),
    "mnist": dict(epsilon=0.1, inner_lr=0.1, ball="global", rho=0.05, asam_rho=0.5),  # not tuned
    "kmnist": dict(epsilon=0.1, inner_lr=0.1, ball="global", rho=0.05, asam_rho=0.5),  # not tuned
}
# SAM's family: a method's own radius where SAM's ρ does not carry over (MSAM steps along the
# normalised momentum, the authors' default ρ = 0.3; bSAM's ε = ρ·g/s is scaled by the precision),
# and bSAM's N = the training-set size after the validation split. Not tuned: tune with --tune rho=...
# bSAM's recipe is its authors' (team-approx-bayes/bayesian-sam, ResNet-18 on CIFAR: ρ 0.01, prior
# precision 40, the data set counted 4× for its augmentation, `--dafactor 4`); on the CPU data sets,
# which are never augmented, and with --augment none the factor is 1. Its lr, warm-up and cosine schedule
# are its registry recipe.
_BSAM = dict(bsam_rho=0.01, bsam_prior_precision=40.0)
FAMILY_PRESETS = {
    "mnist1d": dict(msam_rho=0.3, **_BSAM, bsam_num_data=3600, bsam_data_factor=1.0),
    "spiral": dict(msam_rho=0.3, **_BSAM, bsam_num_data=540, bsam_data_factor=1.0),
    "digits": dict(msam_rho=0.3, **_BSAM, bsam_num_data=1294, bsam_data_factor=1.0),
    "*": dict(msam_rho=0.3, **_BSAM, bsam_num_data=45000, bsam_data_factor=4.0),  # CIFAR: 50k less 10%
}
BSAM_ONLY = ("bsam_num_data", "bsam_prior_precision", "bsam_data_factor")  # other runs keep them empty
# SAM/ASAM on the paper datasets: ρ = 0.05 (Foret et al.) and 0.5 for ASAM (Kwon et al., CIFAR-10).
PAPER_RHO, PAPER_ASAM_RHO = 0.05, 0.5


def paper_amp_preset(model: str, augment: str) -> tuple[float, float]:
    """The paper's ε, ζ for a model and augmentation (falls back to PreActResNet18's)."""
    return PAPER_AMP.get((model, augment)) or PAPER_AMP.get(("*", augment)) or (0.5, 1.0)


def default_nesterov(method: str) -> bool:
    """The SGD's Nesterov when the config leaves it open: the paper's (True), or what the method's authors
    use where its registry entry says (``sgd_defaults``: MSAM's authors run no Nesterov)."""
    rule = registry.rules().get(method)
    return bool(rule.sgd_defaults.get("nesterov", True)) if rule is not None else True


def nesterov_help() -> str:
    """--nesterov's help, naming the rules whose authors' SGD has no Nesterov (from the registry)."""
    off = [name for name, info in registry.rules().items() if info.sgd_defaults.get("nesterov") is False]
    tail = f"; false for {', '.join(off)}, as its authors" if off else ""
    return f"SGD Nesterov momentum, true or false (default true, the paper's{tail})"


def resolve(cfg: TrainConfig, dataset_defaults: dict[str, Any], default_model: str) -> TrainConfig:
    """Fill every None from presets and the dataset's defaults, then validate."""
    c = cfg.replace()
    c.model = c.model or default_model
    rule = registry.rules().get(c.method)
    for key, value in (rule.recipe if rule is not None else {}).items():  # the authors' protocol (bSAM's)
        if getattr(c, key) is None:
            setattr(c, key, value)
    for key in ("epochs", "batch_size", "lr", "weight_decay"):
        if getattr(c, key) is None:
            setattr(c, key, dataset_defaults[key])
    if c.lr_schedule is None:
        c.lr_schedule = dataset_defaults.get("lr_schedule", DEFAULT_LR_SCHEDULE)
    if c.warmup_epochs is None:
        c.warmup_epochs = 0
    if c.nesterov is None:
        c.nesterov = default_nesterov(c.method)
    if c.dataset in PAPER_DATASETS:
        eps, zeta = paper_amp_preset(c.model, c.augment)
        preset = dict(epsilon=eps, inner_lr=zeta, ball="per_tensor", rho=PAPER_RHO, asam_rho=PAPER_ASAM_RHO)
    else:
        preset = dict(CPU_PRESETS.get(c.dataset, CPU_PRESETS["mnist1d"]))
    preset.update(FAMILY_PRESETS.get(c.dataset, FAMILY_PRESETS["*"]))
    if c.method != "bsam":  # N, δ₀, the factor are bSAM's alone: other runs keep the fields empty
        for key in BSAM_ONLY:
            preset.pop(key)
    elif c.augment == "none":  # the factor counts augmented copies: none, no factor
        preset["bsam_data_factor"] = 1.0
    own_rho = {k: preset.pop(k) for k in [k for k in preset if k.endswith("_rho")]}
    if f"{c.method}_rho" in own_rho:  # ASAM's ρ lives on the |w|-scaled sphere, MSAM's, bSAM's: their own
        preset["rho"] = own_rho[f"{c.method}_rho"]
    for key, value in preset.items():
        if getattr(c, key) is None:
            setattr(c, key, value)
    validate(c)
    return c


def validate(c: TrainConfig) -> None:
    """Bad values get a ValueError naming the field."""
    COUNT.check(c.warmup_epochs, "warmup_epochs")
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "accumulate"):
        if not isinstance(getattr(c, key), int) or getattr(c, key) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {getattr(c, key)!r}")
    for key in ("lr", "weight_decay", "momentum", "label_smoothing", "flood_level", "mixup_alpha",
                "adv_epsilon", "dropout"):
        v = getattr(c, key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key} must be a finite number >= 0, got {v!r}")
    if not 0 <= c.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {c.val_fraction!r}")
    LR_SCHEDULES.check(c.lr_schedule, "lr_schedule")
    if c.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    if c.dropout >= 1 or c.label_smoothing >= 1:
        raise ConfigError("dropout and label_smoothing must be < 1")
    rule = registry.rules().get(c.method)
    if c.fsdp and rule is not None and not rule.sharded:
        raise ConfigError(f"--fsdp: {c.method} cannot run on sharded parameters (its registry entry says "
                          "so); use DDP (drop --fsdp)")
    if c.fsdp and c.ddp_local_ascent:
        raise ConfigError("fsdp and ddp_local_ascent exclude each other: per-rank ascent is a DDP option")
    for name, h in registry.config_fields().items():  # the rules' fields, by the registry's rules
        value = getattr(c, name)
        if value is not None or h.trainer_default is not None:
            h.rule.check(value, name)
    if c.grad_clip is not None and not c.grad_clip > 0:
        raise ConfigError(f"grad_clip must be > 0, got {c.grad_clip!r}")
