"""Where data files live, their official URLs and checksums, verification and downloading."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.request import urlopen

from tqdm.auto import tqdm

from flatmin.errors import FlatminError


@dataclass(frozen=True)
class Remote:
    """One official distribution file of a dataset."""

    name: str
    url: str


_GTSRB = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
FILES: dict[str, tuple[Remote, ...]] = {
    "cifar10": (Remote("cifar-10-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),),
    "cifar100": (Remote("cifar-100-python.tar.gz",
                        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),),
    "svhn": (Remote("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
             Remote("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat")),
    "gtsrb": tuple(Remote(n, _GTSRB + n) for n in ("GTSRB_Final_Training_Images.zip",
                                                   "GTSRB_Final_Test_Images.zip",
                                                   "GTSRB_Final_Test_GT.zip")),
}

# Published md5s. CIFAR, SVHN and the two GTSRB test archives as torchvision lists them;
# torchvision trains GTSRB on GTSRB-Training_fixed.zip instead, so the md5 of the official
# GTSRB_Final_Training_Images.zip is the one several independent loaders agree on.
# Module-level so that tests can point it at their own small files.
CHECKSUMS: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "GTSRB_Final_Training_Images.zip": "f33fd80ac59bff73c82d25ab499e03a3",
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}


def cache_dir() -> Path:
    """Per-user cache for generated data and default downloads, overridable for CI and clusters."""
    if os.environ.get("FLATMIN_CACHE"):
        return Path(os.environ["FLATMIN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flatmin"


def default_data_dir() -> Path:
    """Where the official dataset files are looked for when no data_dir is given."""
    return cache_dir() / "data"


def md5sum(path: Path) -> str:
    """Hash in chunks so that a 200 MB archive never sits in memory twice."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, url: str = "") -> None:
    """Reject a corrupt or truncated official file; a pass is remembered by size+mtime."""
    expected = CHECKSUMS.get(path.name)
    if expected is None:
        return
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected}
    sidecar = path.with_name(f".{path.name}.verified")
    try:
        if json.loads(sidecar.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    actual = md5sum(path)
    if actual != expected:
        raise FlatminError(
            f"{path} is corrupt or truncated (md5 {actual}, expected {expected}); delete it and "
            f"download it again{' from ' + url if url else ''}")
    try:
        sidecar.write_text(json.dumps(stamp))
    except OSError:  # a read-only data dir only costs a rehash next time
        pass


def download(url: str, dest: Path, *, progress: bool = True) -> Path:
    """Fetch to a temp file and rename, so an interrupted download never looks like a real file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        expected = CHECKSUMS.get(dest.name)
        if expected is not None and md5sum(Path(tmp)) != expected:
            raise FlatminError(f"downloaded {url} but its md5 is not {expected}; try again, or "
                               f"download it by hand and put it at {dest}")
        os.replace(tmp, dest)
    except (OSError, HTTPException) as err:  # URLError, timeouts, no network, disk full
        raise FlatminError(f"could not download {url} ({err}); download it by hand and put it "
                           f"at {dest}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _missing(dataset: str, missing: list[tuple[Remote, Path]]) -> str:
    """Every absent file with its full path and URL, so one message says all there is to do."""
    lines = "\n".join(f"  {p}   (from {r.url})" for r, p in missing)
    return (f"dataset {dataset!r} needs these files, which are missing:\n{lines}\n"
            "put them there (or pass another data_dir)")


def ensure_files(dataset: str, data_dir: Path, *, download_missing: bool = False,
                 check: bool = True) -> list[Path]:
    """Paths of a dataset's official files, downloaded or explained when absent, and verified."""
    remotes = FILES[dataset]
    paths = [data_dir / r.name for r in remotes]
    missing = [(r, p) for r, p in zip(remotes, paths) if not p.is_file()]
    if missing and not download_missing:
        raise FlatminError(_missing(dataset, missing) + ", or pass download=True (--download)")
    for i, (r, p) in enumerate(missing):
        try:
            download(r.url, p)
        except FlatminError as err:
            raise FlatminError(f"{err}\n{_missing(dataset, missing[i:])}") from err
    if check:
        for r, p in zip(remotes, paths):
            verify(p, r.url)
    return paths
