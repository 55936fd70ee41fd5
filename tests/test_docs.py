"""The documentation is tested: every ```python block of README.md and docs/*.md runs as written,
and the README's ``flatmin`` command lines run with tiny sizes.

**Python blocks.** A small extractor (`blocks`) collects each file's fenced blocks in order. A file's
Python blocks run in order in one namespace, so a later block may use an earlier one's names. Where
the text means *your* model or data, the namespace holds tiny stand-ins (`stand_ins`):

- ``model``: ``Linear(4, 3)`` in a module whose ``forward(x, labels=None)`` gives logits, or with
  ``labels`` a Hugging Face style ``{"loss", "logits"}`` (so the same model serves a plain loop and
  the ``Trainer``);
- ``loader``: a ``DataLoader`` of 8 examples ``(x, y)`` in batches of 4; ``x``, ``y``: one batch;
- ``loss_fn``: ``F.cross_entropy``; ``closure``: zero the gradients, backward, return the loss;
- ``ds``: a ``Dataset`` of 32 ``{"x", "labels"}`` items (for the ``Trainer``); ``epochs``: 2.

Every block runs in a fresh temporary working directory per file (what a snippet writes stays
there). A marker, an HTML comment on the line before the fence, changes what happens to a block:

- ``<!-- test: requires MODULE[, MODULE] -->``: skipped only where an optional extra is missing
  (the reason names it); ``<!-- test: requires cuda -->`` skips without a GPU;
- ``<!-- test: skip (REASON) -->``: never run, with the reason;
- ``<!-- test: excerpt of PATH -->``: a quotation of library source; the test checks that PATH
  still contains it, line for line (it is not runnable on its own).

**README command lines.** Every line of a README ``bash`` block that runs ``flatmin`` either runs
(`test_readme_commands`, one test per block, its commands in order in one folder) or is listed in
`NOT_RUN` with the reason. The documented substitution for tiny sizes (`tiny`): ``--epochs N`` becomes
``--epochs 1``, ``--seeds S`` becomes ``--seeds 0,1``, ``train`` and ``compare`` without ``--epochs``
get ``--epochs 1``, ``compare`` without ``--seeds`` gets ``--seeds 0,1`` and every ``compare`` gets
``--cost-epochs 1``; nothing else changes. On a line such as ``bash scripts/setup.sh && .venv/bin/flatmin
compare`` (the main job) only the flatmin command runs (the test already runs in the environment). The files a
line names as the user's own (``data.npz``, ``mypkg.nets:resnet``, ``~/my_images``, ``~/my_table``,
``grid.toml``) are written as tiny stand-ins first (`user_files`), with ``HOME`` set to the folder.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*test:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the line of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, in order, each with the marker on the line before it."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, ticks = i, fence.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(ticks):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        m = MARKER.search(prev)
        found.append(Block(path, start + 1, fence.group(2).lower(), "\n".join(lines[start + 1:j]) + "\n",
                           m.group(1) if m else None))
        i = j + 1
    return found


PYTHON = [b for p in DOCS for b in blocks(p) if b.lang in ("python", "py")]


def test_extractor_finds_the_blocks():
    assert len(PYTHON) >= 8  # README 4, architecture 1, distributed 1, experiments 1, family 2
    for b in PYTHON:
        known = r"requires [\w., ]+|skip \(.+\)|excerpt of \S+"
        assert b.marker is None or re.fullmatch(known, b.marker), b.name


# -- the stand-ins -------------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """``Linear(4, 3)``: logits, or with ``labels`` the ``{"loss", "logits"}`` a HF model returns."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.lin(x)
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Items(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def stand_ins() -> dict:
    """What a snippet calls *your* model, data, loss and closure (see the module docstring)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    model = TinyNet()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs[:8], ys[:8]), batch_size=4)
    x, y = xs[:4], ys[:4]

    def closure():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return {"__name__": "__docs__", "model": model, "loader": loader, "x": x, "y": y,
            "loss_fn": F.cross_entropy, "closure": closure, "ds": Items(xs, ys), "epochs": 2}


# -- python blocks -------------------------------------------------------------------------------------

def skip_reason(marker: str | None) -> str | None:
    """Why a block does not run here (None: it runs)."""
    if marker is None or marker.startswith("excerpt of"):
        return None
    if marker.startswith("skip"):
        return marker[len("skip"):].strip(" ()")
    missing = []
    for name in (n.strip() for n in marker[len("requires"):].split(",")):
        if name == "cuda":
            if not torch.cuda.is_available():
                missing.append("a CUDA device")
            continue
        try:
            __import__(name)
        except ImportError:
            missing.append(f"the {name} extra")
    return "needs " + " and ".join(missing) if missing else None


class Session:
    """Each file's namespace and working folder, shared by its blocks in order."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.ns, self.done = folder, stand_ins(), 0


_sessions: dict[Path, Session] = {}


def run_block(block: Block) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.code, block.name, "exec"), _sessions[block.path].ns)


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block(block, tmp_path_factory, monkeypatch):
    """Runs the file's earlier blocks first (once per session), then this one, as written."""
    if block.marker and block.marker.startswith("excerpt of"):
        source = (ROOT / block.marker.split(None, 2)[2]).read_text(encoding="utf-8")
        assert block.code.strip() in source, f"{block.name} no longer quotes {block.marker.split(None, 2)[2]}"
        return
    session = _sessions.get(block.path)
    if session is None:
        session = _sessions[block.path] = Session(tmp_path_factory.mktemp(block.path.stem))
    monkeypatch.chdir(session.folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = [b for b in PYTHON if b.path == block.path and b.line < block.line]
    for b in before[session.done:]:
        if skip_reason(b.marker) is None and not (b.marker or "").startswith("excerpt of"):
            run_block(b)
    session.done = len(before) + 1
    reason = skip_reason(block.marker)
    if reason:
        pytest.skip(f"{block.name}: {reason}")
    run_block(block)


# -- the README's command lines ------------------------------------------------------------------------

README = ROOT / "README.md"
# Lines of the README's bash blocks that name flatmin but are not run here, with the reason.
NOT_RUN = {
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n auto": "the test suite itself",
    "flatmin grid grid.toml --backend ray --ray-address auto --out /shared/x":
        "needs a Ray cluster (the backend is tested in tests/test_ray_backend.py)",
    "torchrun --nproc_per_node=2 -m flatmin train --dataset mnist1d --method amp":
        "two processes on the shared cores (DDP training is tested in tests/test_ddp.py)",
    ".venv/bin/python -m pytest -q -n auto": "the test suite itself",
    ".venv/bin/python -m pytest -q -n auto -m not slow": "the test suite itself (its quick part)",
    ".venv/bin/python -m pytest -q tests/conformance": "the test suite itself (the conformance matrix)",
    ".venv/bin/ruff check src tests benchmarks": "lint, run by CI",
    "bash scripts/setup.sh": "creates the virtual environment",
    "python benchmarks/step_cost.py --model preactresnet18 --batch-size 50 --json out.json":
        "a benchmark (PreActResNet18 steps), not a user command",
}


def bash_lines(block: Block) -> list[str]:
    """The block's command lines, without comments."""
    return [" ".join(shlex.split(line, comments=True)) for line in block.code.splitlines()
            if shlex.split(line, comments=True)]


def flatmin_argv(command: str) -> list[str] | None:
    """``flatmin ARGS`` (also ``.venv/bin/flatmin``) as ARGS; None for any other program."""
    words = shlex.split(command)
    if words and Path(words[0]).name == "flatmin":
        return words[1:]
    return None


def tiny(argv: list[str]) -> list[str]:
    """The documented substitution: 1 epoch, seeds 0 and 1, a 1-epoch cost measurement."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--epochs":
            out += ["--epochs", "1"]
            i += 2
        elif argv[i] == "--seeds":
            out += ["--seeds", "0,1"]
            i += 2
        else:
            out.append(argv[i])
            i += 1
    if out and out[0] in ("train", "compare") and "--epochs" not in out and "--resume" not in out:
        out += ["--epochs", "1"]
    if out and out[0] == "compare":
        out += ["--cost-epochs", "1"] + ([] if "--seeds" in out else ["--seeds", "0,1"])
    return out


def user_files(folder: Path) -> None:
    """Tiny stand-ins for the files the README's lines call the user's own."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = np.arange(60) % 3
    np.savez(folder / "data.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "nets.py").write_text(
        "import math\nfrom torch import nn\n\n"
        "def resnet(num_classes, input_shape, **kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))\n")
    from PIL import Image
    for split, n in (("train", 8), ("test", 4)):
        for label in ("cat", "dog"):
            d = folder / "my_images" / split / label
            d.mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{k}.png")
    (folder / "my_table").mkdir()
    for split, n in (("train", 40), ("test", 20)):
        rows = ["a,b,diagnosis"] + [f"{rng.normal():.4f},{rng.normal():.4f},{('benign', 'malign')[k % 2]}"
                                    for k in range(n)]
        (folder / "my_table" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (folder / "grid.toml").write_text('[grid]\nmethod = ["erm", "amp"]\ndataset = "spiral"\nseeds = 1\n'
                                      'epochs = 1\n\n[run]\nout = "runs/grid"\nworkers = 2\n')


BASH = [b for b in blocks(README) if b.lang in ("bash", "sh")
        and any(flatmin_argv(c) is not None for line in bash_lines(b) for c in line.split("&&"))]


def test_every_readme_command_is_run_or_says_why():
    seen = set()
    for block in blocks(README):
        if block.lang not in ("bash", "sh"):
            continue
        for line in bash_lines(block):
            seen.add(line)
            runs = any(flatmin_argv(c.strip()) is not None for c in line.split("&&"))
            assert runs or line in NOT_RUN, f"{block.name}: {line!r} is neither run nor in NOT_RUN"
    assert not set(NOT_RUN) - seen, f"NOT_RUN names lines the README no longer has: {set(NOT_RUN) - seen}"


@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_readme_commands(block, tmp_path):
    """The block's flatmin commands in order, in one folder with the user's stand-in files."""
    from flatmin.data.download import cache_dir

    user_files(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path), "FLATMIN_CACHE": str(cache_dir()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for line in bash_lines(block):
        if line in NOT_RUN:
            continue
        for command in line.split("&&"):
            argv = flatmin_argv(command.strip())
            if argv is None:
                continue
            argv = tiny(argv)  # "~" is the stand-in HOME, expanded by flatmin as for a user
            done = subprocess.run([sys.executable, "-m", "flatmin", *argv], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            said = f"{block.name}: flatmin {' '.join(argv)}\n{done.stdout}\n{done.stderr}"
            assert done.returncode == 0, said
