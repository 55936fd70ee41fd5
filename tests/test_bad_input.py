"""Every subcommand × the bad values a careless or hostile user gives: a non-zero exit, no traceback,
at most two lines, and nothing written (the working folder is compared before and after).

Commands run in-process through `flatmin.cli.main`; the read-only-folder cases run in one child
process with root's override dropped by `setpriv` (the tests run as root, who may write anywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from flatmin.cli import COMMANDS, main
from flatmin.train import TrainConfig, train

SRC = Path(__file__).parents[1] / "src"
NUMBERS = {  # kind of option -> values it must refuse
    "pos": ["nan", "inf", "-inf", "-1", "0", "", "x"],
    "nonneg": ["nan", "inf", "-1", "-1e-9", "", "x"],
    "posint": ["nan", "inf", "-1", "0", "", "1.5", "x"],
    "count": ["nan", "-1", "", "1.5"],
    "axis": ["nan", "1", "0", "-3", ""],  # grid points per axis: >= 2
    "seeds": ["0", "-2", "", "nan", "1,1", "a"],
    "radii": ["nan", "0,inf", "-1", "", "a"],
}
# command -> (arguments that make it valid, {flag: kind}, its --out flag or None)
CASES: dict[str, tuple[list[str], dict[str, str], str | None]] = {
    "train": (["--dataset", "spiral", "--epochs", "1", "--quiet"],
              {"--epochs": "posint", "--batch-size": "posint", "--lr": "pos", "--epsilon": "nonneg",
               "--rho": "nonneg", "--seed": "count", "--threads": "posint", "--momentum": "nonneg"}, "--out"),
    "compare": (["--dataset", "spiral", "--epochs", "1", "--seeds", "1", "--workers", "1", "--no-figures"],
                {"--epochs": "posint", "--lr": "pos", "--inner-lr": "nonneg", "--workers": "posint",
                 "--seeds": "seeds", "--tune-seeds": "seeds"}, "--out"),
    "grid": (["--methods", "erm", "--dataset", "spiral", "--epochs", "1", "--workers", "1"],
             {"--epochs": "posint", "--batch-size": "posint", "--lr": "pos", "--workers": "posint",
              "--seeds": "seeds"}, "--out"),
    "report": (["{db}"], {}, "--out"),
    "landscape": (["{ckpt}", "--points", "3", "--max-examples", "20"],
                  {"--span": "pos", "--points": "axis", "--max-examples": "posint", "--batch-size": "posint",
                   "--seed": "count"}, "--out"),
    "sharpness": (["{ckpt}", "--max-examples", "20", "--iters", "2", "--samples", "2", "--steps", "2"],
                  {"--epsilon": "pos", "--iters": "posint", "--samples": "posint", "--steps": "posint",
                   "--batch-size": "posint", "--max-examples": "posint", "--seed": "count"}, "--out"),
    "radius": (["--dataset", "spiral", "--epochs", "1", "--epsilons", "0"],
               {"--epsilons": "radii", "--epochs": "posint", "--lr": "pos", "--threads": "posint"}, "--out"),
    "theory": (["--steps", "5"], {"--epsilon": "pos", "--steps": "posint"}, "--out"),
    "gradnorm": (["{run}"],
                 {"--omega-epsilon": "nonneg", "--omega-inner-lr": "nonneg", "--threads": "posint"}, "--out"),
    "spiral": (["--epochs", "1", "--n-samples", "100", "--grid-points", "5"],
               {"--n-samples": "posint", "--noise": "nonneg", "--grid-points": "axis", "--lr": "pos",
                "--seed": "count"}, "--out"),
    "calibration": (["{run}"], {}, "--out"),
    "cost": (["--dataset", "spiral", "--models", "mlp", "--epochs", "1"],
             {"--epochs": "posint", "--lr": "pos", "--batch-size": "posint", "--threads": "posint"}, "--out"),
}
DEVICES = ["train", "compare", "grid", "landscape", "sharpness", "radius", "spiral", "cost"]


def bad_cases() -> list[tuple[str, list[str]]]:
    """(command, the offending arguments) for every command × option × bad value, plus paths and devices."""
    out = []
    for cmd, (_, flags, out_flag) in CASES.items():
        out += [(cmd, [flag, value]) for flag, kind in flags.items() for value in NUMBERS[kind]]
        if out_flag:
            out += [(cmd, [out_flag, "{file}"]), (cmd, [out_flag, "{file}/sub"]), (cmd, [out_flag, ""])]
    out += [(cmd, ["--device", dev]) for cmd in DEVICES for dev in ("banana", "cuda:99", "")]
    if not torch.cuda.is_available():
        out += [(cmd, ["--device", "cuda"]) for cmd in DEVICES]
    out += [("compare", ["--methods", ""]), ("compare", ["--methods", "nope"]), ("compare", ["--tune", "lr"]),
            ("compare", ["--tune", "lr=nan"]), ("grid", ["--set", "lr"]), ("grid", ["--methods", ""]),
            ("grid", ["--set", "epsilon=-1"]), ("spiral", ["--methods", ""]),
            ("cost", ["--methods", "amp,nope"]),
            ("report", ["{file}"]), ("report", ["{work}"]), ("calibration", ["--db", ""]),
            ("landscape", ["{file}"]), ("gradnorm", ["--train", "--methods", ""])]
    out += [(cmd, ["--threads", "100000"]) for cmd in ("train", "radius", "gradnorm", "spiral", "cost")]
    out += [("compare", ["--seeds", "1000000000000"]), ("grid", ["--seeds", "100000000000"]),
            ("compare", ["--tune-seeds", "20000"]),
            ("compare", ["--backend", "ray", "--cpus-per-run", "nan"]),
            ("compare", ["--backend", "ray", "--gpus-per-run", "-1"]),
            ("compare", ["--backend", "ray", "--max-retries", "1.5"]),
            ("compare", ["--variants", ""]), ("compare", ["--variants", ","]),
            ("cost", ["--methods", ""]), ("cost", ["--methods", ","]), ("cost", ["--models", ""]),
            ("cost", ["--models", ","]), ("landscape", ["--splits", ","]),
            *[("train", ["--method", m, flag, v]) for m, flag, v in (  # an option the method ignores
                ("erm", "--ball", "square"), ("erm", "--ball", "global"), ("erm", "--epsilon", "0.1"),
                ("sam", "--dropout", "0.2"), ("amp", "--reuse-every", "3"))],
            # an option no compared method reads, in a flag, a spec or a tuned field
            ("compare", ["--methods", "erm,sam", "--ball", "global"]),
            ("compare", ["--methods", "erm,sam:ball=global"]),
            ("compare", ["--methods", "erm,sam", "--tune", "epsilon=0.1,0.2"]),
            ("compare", ["--methods", "amp", "--reuse-every", "3"]), ("grid", ["--epsilon", "0.1"]),
            ("compare", ["--methods", "erm,erm:train_size=0"])]
    out += [("train", ["--dataset", f"{kind}:{{work}}/data/{name}", *extra])
            for name, (kind, extra) in DATA.items()]
    return out


# The user's own data files that must be refused in one line: name -> (dataset kind, extra flags).
DATA = {
    "empty.npz": ("npz", []), "huge_header.npz": ("npz", []), "label_1e9.npz": ("npz", []),
    "nan.npz": ("npz", []), "inf.npz": ("npz", []), "test_label_7.npz": ("npz", []),
    "images.npz": ("npz", ["--model", "cnn1d"]), "images_3_logits.npz": ("npz", ["--model", "{factory}"]),
    "label_1e9_csv": ("csv", []), "binary_csv": ("csv", []), "bomb_png": ("folder", []),
    "small_png": ("folder", ["--image-size", "100000"]),
}


def write_data(root: Path) -> None:
    """The files of `DATA` (tiny: the point is what they declare, not what they hold)."""
    import io
    import struct
    import zipfile
    import zlib

    import numpy as np
    from PIL import Image

    root.mkdir()
    x, y = np.random.default_rng(0).random((30, 4), dtype=np.float32), np.arange(30) % 3

    def npz(name: str, **change) -> None:
        np.savez(root / name, **{"x_train": x, "y_train": y, "x_test": x[:6], "y_test": y[:6], **change})

    (root / "empty.npz").write_bytes(b"")
    npz("nan.npz", x_train=np.where(np.arange(4) == 2, np.nan, x).astype(np.float32))
    npz("inf.npz", x_test=np.where(np.arange(4) == 1, np.inf, x[:6]).astype(np.float32))
    npz("label_1e9.npz", y_train=np.where(np.arange(30) == 0, 10**9, y))
    npz("test_label_7.npz", y_test=np.full(6, 7))
    img = np.random.default_rng(0).random((30, 1, 6, 6), dtype=np.float32)
    npz("images.npz", x_train=img, x_test=img[:6])
    npz("images_3_logits.npz", x_train=x[:, :3], x_test=x[:6, :3], y_train=np.arange(30) % 5, y_test=y[:6])
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 1000), }"
    head = d + " " * (63 - (10 + len(d)) % 64) + "\n"
    with zipfile.ZipFile(root / "huge_header.npz", "w") as z:
        magic = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head))
        z.writestr("x_train.npy", magic + head.encode() + bytes(64))
        for k, a in (("y_train", y), ("x_test", x), ("y_test", y)):
            buf = io.BytesIO()
            np.save(buf, a)
            z.writestr(f"{k}.npy", buf.getvalue())
    for name, label in (("label_1e9_csv", 10**9), ("binary_csv", None)):
        (root / name).mkdir()
        for split in ("train", "test"):
            text = "a,b,label\n" + "".join(f"{i},{i % 2},{label if i == 0 else i % 3}\n" for i in range(20))
            (root / name / f"{split}.csv").write_bytes(text.encode() if label else bytes(range(256)) * 4)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for name in ("bomb_png", "small_png"):
        for split in ("train", "test"):
            for c in ("a", "b"):
                (root / name / split / c).mkdir(parents=True)
                pixels = np.full((4, 4), 40 if c == "a" else 200, np.uint8)
                Image.fromarray(pixels).save(root / name / split / c / "0.png")
    (root / "bomb_png" / "train" / "a" / "big.png").write_bytes(  # a header declaring 60000 x 60000
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b""))


GRID_FILES = {  # name -> content: each is refused before any run
    "malformed.yaml": "grid:\n  method: [erm, amp\n  epochs: {\n",
    "binary.toml": bytes(range(256)) * 4,
    "five.toml": "grid = 5\n",
    "list.yaml": "grid: [1, 2]\n",
    "workers.toml": '[grid]\nmethod = "erm"\n[run]\nworkers = "many"\n',
    "empty.toml": "",
    "blank.yaml": "\n\n",
    "unknown_run.toml": '[grid]\nmethod = "erm"\n[run]\nretries = 3\n',
    "unknown_field.toml": '[grid]\nmethod = "erm"\nepsilonn = 0.1\n',
    "unknown_table.toml": '[grdi]\nmethod = "erm"\n',
    "seeds.toml": '[grid]\nmethod = "erm"\nseeds = -2\n',
    "many_seeds.toml": '[grid]\nmethod = "erm"\nseeds = 100000000000\n',
    "lr.toml": '[grid]\nlr = ["fast"]\n',
    "nan.toml": '[grid]\nlr = nan\n',
    "empty_list.toml": '[grid]\nmethod = []\n',
    "device.toml": '[grid]\ndevice = "banana"\n',
    "tune.toml": '[grid]\nmethod = "amp"\n[tune]\nepsilon = 0.1\n',
    "unread.toml": '[grid]\nmethod = ["erm", "sam"]\nepsilon = [0.1, 0.2]\n',
    "unread_tune.toml": '[grid]\nmethod = ["erm", "sam"]\n[tune]\nepsilon = [0.1, 0.2]\n',
    "tune_metric.toml": '[grid]\nmethod = "amp"\n[tune]\nmetric = "accuracy"\nepsilon = [0.1, 0.2]\n',
}


@pytest.fixture(scope="module")
def work() -> Path:
    """A folder every user may read (nobody included), holding one tiny finished run and a results DB."""
    root = Path(tempfile.mkdtemp(prefix="flatmin-bad-"))
    root.chmod(0o755)
    run = root / "run"
    torch.manual_seed(0)
    train(TrainConfig(dataset="spiral", epochs=1, dataset_options={"n_samples": 100}), run, progress=False)
    (root / "file").write_text("a file, not a folder\n")
    db = sqlite3.connect(root / "results.db")
    db.execute("CREATE TABLE runs (key TEXT PRIMARY KEY)")
    db.close()
    (root / "ro").mkdir(mode=0o755)
    gf = root / "gridfiles"
    gf.mkdir()
    for name, content in GRID_FILES.items():
        (gf / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    write_data(root / "data")
    (root / "three_logits.py").write_text(FACTORY)
    for p in root.rglob("*"):
        p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    yield root
    shutil.rmtree(root, ignore_errors=True)


FACTORY = """
from torch import nn


def net(num_classes, input_shape):  # a head with the wrong number of logits: 3, whatever the data
    return nn.Linear(input_shape[0], 3)
"""


def fill(args: list[str], work: Path) -> list[str]:
    """Put the fixture's paths into an argument list."""
    names = {"run": work / "run", "ckpt": work / "run" / "checkpoint.pt", "db": work / "results.db",
             "file": work / "file", "work": work, "ro": work / "ro", "factory": f"{work}/three_logits.py:net"}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in args]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: 'nothing written' means this does not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def command_line(cmd: str, bad: list[str], work: Path) -> list[str]:
    """The valid arguments with the bad ones added (an `--out` is added unless the case names one)."""
    good, _, out_flag = CASES[cmd]
    args = [cmd, *fill(good, work), *fill(bad, work)]
    if out_flag and out_flag not in bad:
        args += [out_flag, str(work / "new_out")]
    return args


def check(rc: int, out: str, err: str, before: dict, after: dict, expect_rc: int = 2) -> None:
    lines = (out + err).strip().splitlines()
    assert rc == expect_rc, (rc, out, err)
    assert "Traceback" not in out + err
    assert 1 <= len(lines) <= 2, lines
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_every_command_is_in_the_table():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("cmd, bad", bad_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_value_is_one_line_and_writes_nothing(cmd, bad, work, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(work)
    monkeypatch.setenv("FLATMIN_DATA", str(tmp_path))  # the decoded-data cache: outside the snapshot
    before = snapshot(work)
    rc = main(command_line(cmd, bad, work))
    out, err = capsys.readouterr()
    check(rc, out, err, before, snapshot(work))


@pytest.mark.parametrize("name", sorted(GRID_FILES))
def test_bad_grid_file_is_named_before_any_run(name, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    before = snapshot(work)
    rc = main(["grid", str(work / "gridfiles" / name), "--out", str(work / "new_out")])
    out, err = capsys.readouterr()
    check(rc, out, err, before, snapshot(work))
    assert name in err or "[" in err  # names the file or the table at fault


def damaged_store(path: Path) -> Path:
    """A results DB in WAL mode (as flatmin writes it) whose pages past the header are overwritten."""
    from flatmin.results.store import Store

    s = Store(path)
    for i in range(300):
        s.db.execute("INSERT INTO runs (key, config, metrics, label) VALUES (?,?,?,?)",
                     (f"k{i}", json.dumps({"pad": "x" * 200}), "{}", "erm"))
    s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = bytearray(path.read_bytes())
    data[3 * 4096: 3 * 4096 + 3000] = b"\x55" * 3000
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("args", [
    ["report", "{db}"], ["report", "{db}", "--out", "{dir}/rep"],
    ["calibration", "--db", "{db}", "--out", "{dir}/c"],
    ["grid", "--methods", "erm", "--dataset", "spiral", "--epochs", "1", "--db", "{db}", "--out", "{dir}/g"],
    ["compare", "--dataset", "spiral", "--epochs", "1", "--seeds", "1", "--out", "{dir}"],
])
def test_a_damaged_store_is_never_written_and_names_the_rebuild(args, tmp_path, capsys):
    db = damaged_store(tmp_path / "results.db")
    before_bytes, before = db.read_bytes(), snapshot(tmp_path)
    rc = main([a.format(db=db, dir=tmp_path) for a in args])
    out, err = capsys.readouterr()
    check(rc, out, err, before, snapshot(tmp_path), expect_rc=1)
    assert db.read_bytes() == before_bytes
    assert "re-run" in err and f"mv {db}" in err


def flip_tensor_bytes(ckpt: Path, n: int = 64) -> None:
    """Overwrite n bytes in the middle of the largest tensor of a torch.save file (stored, not
    compressed: the bytes sit in the file as they are), as a bad sector or a bad copy would."""
    import zipfile

    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(ckpt.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:][:2], "little"), int.from_bytes(
        data[info.header_offset + 28:][:2], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    data[start:start + n] = bytes(255 - b for b in data[start:start + n])
    ckpt.write_bytes(bytes(data))


def other_files(root: Path) -> dict[str, Path]:
    """Files flatmin did not write: a 0-byte file, an empty SQLite file, another program's database."""
    (root / "zero.db").write_bytes(b"")
    sqlite3.connect(root / "empty.db").execute("VACUUM")
    db = sqlite3.connect(root / "people.db")
    db.execute("CREATE TABLE people (name TEXT)")
    db.execute("INSERT INTO people VALUES ('ada')")
    db.commit()
    db.close()
    return {p.name: p for p in root.glob("*.db")}


@pytest.mark.parametrize("args", [
    ["report", "{dir}/zero.db"], ["report", "{dir}/empty.db"], ["report", "{dir}/people.db"],
    ["report", "{dir}/people.db", "--out", "{dir}/rep"],
    ["calibration", "--db", "{dir}/people.db", "--out", "{dir}/c"],
    ["calibration", "--db", "{dir}/zero.db", "--out", "{dir}/c"],
    ["grid", "--methods", "erm", "--dataset", "spiral", "--epochs", "1", "--db", "{dir}/people.db",
     "--out", "{dir}/g"],
    ["landscape", "{dir}/run/checkpoint.pt", "--points", "3", "--out", "{dir}/l"],
    ["sharpness", "{dir}/run/checkpoint.pt", "--iters", "2", "--out", "{dir}/s"],
    ["train", "--dataset", "spiral", "--epochs", "2", "--quiet", "--resume", "--out", "{dir}/run"],
], ids=lambda a: " ".join(a[:2]) + " " + next(x for x in a if "{dir}/" in x).rsplit("/", 1)[-1])
def test_a_file_flatmin_did_not_write_or_a_damaged_one_is_refused_untouched(args, work, tmp_path, capsys):
    """report/calibration on a store flatmin did not write, an analysis or a resume on a checkpoint with
    64 bytes flipped inside a tensor: one line naming the file, every byte unchanged, nothing written."""
    other_files(tmp_path)
    shutil.copytree(work / "run", tmp_path / "run")
    flip_tensor_bytes(tmp_path / "run" / "checkpoint.pt")
    contents = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = snapshot(tmp_path)
    rc = main([a.format(dir=tmp_path) for a in args])
    out, err = capsys.readouterr()
    check(rc, out, err, before, snapshot(tmp_path))
    assert {p: p.read_bytes() for p in contents} == contents
    named = next(a for a in args if "{dir}/" in a and not a.endswith(("/rep", "/c", "/g", "/l", "/s")))
    assert Path(named.format(dir=tmp_path)).name in err
    if "checkpoint" in named or args[0] == "train":
        assert "damaged" in err


def test_one_line_for_each_user_caused_os_error(monkeypatch, capsys, tmp_path):
    """A full disk mid-run is a failed run (exit 1), a permission a usage error (exit 2): one line each."""
    import errno

    from flatmin.cli import theory

    for code, expect in ((errno.ENOSPC, 1), (errno.EACCES, 2), (errno.EROFS, 2)):
        def boom(*_a, code=code, **_k):
            raise OSError(code, os.strerror(code), str(tmp_path / "theory.json"))

        monkeypatch.setattr(theory, "write_json", boom)
        rc = main(["theory", "--steps", "3", "--out", str(tmp_path)])
        out, err = capsys.readouterr()
        assert rc == expect and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "theory.json" in err and os.strerror(code) in err


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    """No blanket except: an unexpected exception propagates (Python prints its traceback)."""
    from flatmin.cli import theory

    monkeypatch.setattr(theory, "theorem1", lambda *a: {}["missing"])
    with pytest.raises(KeyError):
        main(["theory", "--steps", "3", "--out", str(tmp_path)])


def read_only_cases(work: Path) -> list[list[str]]:
    """Every command with an --out, pointed inside a folder that user nobody may not write."""
    return [command_line(cmd, [flag, "{ro}/sub"], work) for cmd, (_, _, flag) in CASES.items() if flag]


CHILD = """
import io, json, sys, contextlib
from flatmin.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_read_only_out_folder_in_every_command(work):
    """As user nobody, `--out` inside a folder nobody may write: every command refuses it up front."""
    cases = read_only_cases(work)
    before = snapshot(work)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(SRC), "HOME": str(work),
           "PYTHONDONTWRITEBYTECODE": "1"}
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run([*nobody, sys.executable, "-c", CHILD, json.dumps(cases)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases) == sum(1 for c in CASES.values() if c[2])
    for args, (rc, out, err) in zip(cases, results):
        check(rc, out, err, before, before)  # the snapshot is compared once, below
        assert "permission" in err, (args, err)
    assert snapshot(work) == before


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs, nearly filled: real ENOSPC (needs root's CAP_SYS_ADMIN to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "fill").write_bytes(b"\0" * (256 * 1024 - 12 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_exit_1(full_disk, capsys, monkeypatch):
    """`train` on a disk that fills mid-run: one line naming the file, exit 1, no half-written file."""
    monkeypatch.chdir(full_disk)
    out = full_disk / "run"
    rc = main(["train", "--dataset", "spiral", "--epochs", "1", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert os.strerror(28) in err and str(out) in err
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`flatmin train ... | true`: the reader has left before the first write; no BrokenPipeError
    traceback, exit 141 (128 + SIGPIPE, what a shell shows), the run itself saved."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = (f"{sys.executable} -m flatmin train --dataset spiral --epochs 1 --quiet --out {tmp_path / 'r'} "
           "| true; echo ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stderr == "" and proc.stdout.strip() == "141", (proc.stdout, proc.stderr)
    assert (tmp_path / "r" / "metrics.json").is_file()
