"""Where data files live, their official URLs and checksums, verification and downloading."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
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
# The IDX data sets share their four file names, so each lives in a folder named after it.
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IDX_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's; LeCun's site 403s
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "kmnist": "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
}
FILES.update({ds: tuple(Remote(f"{ds}/{n}", url + n) for n in IDX_NAMES)
              for ds, url in IDX_MIRRORS.items()})
# Where a system package puts a data set, searched after data_dir, and how to get it there.
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
SYSTEM_HINTS = {"fashion-mnist": "install the Debian package (as root: apt-get install "
                                 "dataset-fashion-mnist, which fills /usr/share/datasets/fashion-mnist)"}

# Published md5s. CIFAR, SVHN and the two GTSRB test archives as torchvision lists them;
# torchvision trains GTSRB on GTSRB-Training_fixed.zip instead, so the md5 of the official
# GTSRB_Final_Training_Images.zip is the one several independent loaders agree on.
# Module-level so that tests can point it at their own small files.
CHECKSUMS: dict[str, str | tuple[str, ...]] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "GTSRB_Final_Training_Images.zip": "f33fd80ac59bff73c82d25ab499e03a3",
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}
# IDX files as torchvision lists them; Debian's dataset-fashion-mnist (0.0~git20200523.55506a9-1)
# recompressed the same IDX payload, so its gzip files have md5s of their own, accepted too.
_IDX_MD5 = {
    "mnist": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    "fashion-mnist": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                      "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    "kmnist": ("bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
               "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"),
}
_DEBIAN_FASHION = ("cf8536b0aa1a6ac5fa3f23001093305c", "10bea18fdb374794d4bb42e356e600c9",
                   "f78720b4224f21cce2f2ccf2d7a94c9a", "0d30e22e447f3c33dab9ed536400ac01")
CHECKSUMS.update({f"{ds}/{n}": md5 for ds, sums in _IDX_MD5.items() for n, md5 in zip(IDX_NAMES, sums)})
CHECKSUMS.update({f"fashion-mnist/{n}": (CHECKSUMS[f"fashion-mnist/{n}"], md5)
                  for n, md5 in zip(IDX_NAMES, _DEBIAN_FASHION)})


def _accepted(key: str) -> tuple[str, ...]:
    """The md5s a file may have (none known: not checked); keys are Remote names."""
    expected = CHECKSUMS.get(key, ())
    return (expected,) if isinstance(expected, str) else tuple(expected)


def cache_dir() -> Path:
    """Per-user cache for generated data and default downloads, overridable for CI and clusters."""
    if os.environ.get("FLATMIN_CACHE"):
        return Path(os.environ["FLATMIN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flatmin"


def default_data_dir() -> Path:
    """Where the official dataset files are looked for when no data_dir is given: $FLATMIN_DATA."""
    if os.environ.get("FLATMIN_DATA"):
        return Path(os.environ["FLATMIN_DATA"]).expanduser()
    return cache_dir() / "data"


def md5sum(path: Path) -> str:
    """Hash in chunks so that a 200 MB archive never sits in memory twice."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, url: str = "", key: str | None = None, remember: bool = True) -> None:
    """Reject a corrupt or truncated official file; a pass is remembered by size+mtime."""
    accepted = _accepted(key or path.name)
    if not accepted:
        return
    expected = " or ".join(accepted)
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected}
    sidecar = path.with_name(f".{path.name}.verified")
    try:
        if json.loads(sidecar.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    actual = md5sum(path)
    if actual not in accepted:
        raise FlatminError(
            f"{path} is corrupt or truncated (md5 {actual}, expected {expected}); delete it and "
            f"download it again{' from ' + url if url else ''}")
    if not remember:  # a system folder (apt's) is not ours to write in
        return
    try:
        sidecar.write_text(json.dumps(stamp))
    except OSError:  # a read-only data dir only costs a rehash next time
        pass


def download(url: str, dest: Path, *, progress: bool = True, key: str | None = None) -> Path:
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
        accepted = _accepted(key or dest.name)
        if accepted and md5sum(Path(tmp)) not in accepted:
            raise FlatminError(f"downloaded {url} but its md5 is not {accepted[0]}; try again, or "
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
    hint = f", or {SYSTEM_HINTS[dataset]}" if dataset in SYSTEM_HINTS else ""
    return (f"dataset {dataset!r} needs these files, which are missing:\n{lines}\n"
            f"put them there (or pass another data_dir){hint}")


def ensure_files(dataset: str, data_dir: Path, *, download_missing: bool = False,
                 check: bool = True) -> list[Path]:
    """Paths of a dataset's official files, downloaded or explained when absent, and verified."""
    remotes = FILES[dataset]
    paths = [data_dir / r.name for r in remotes]
    missing = [(r, p) for r, p in zip(remotes, paths) if not p.is_file()]
    system = SYSTEM_DIRS.get(dataset)
    if missing and system is not None:
        found = [system / PurePosixPath(r.name).name for r in remotes]
        if all(p.is_file() for p in found):
            if check:
                for r, p in zip(remotes, found):
                    verify(p, r.url, r.name, remember=False)
            return found
    if missing and not download_missing:
        raise FlatminError(_missing(dataset, missing) + ", or pass download=True (--download)")
    for i, (r, p) in enumerate(missing):
        try:
            download(r.url, p, key=r.name)
        except FlatminError as err:
            raise FlatminError(f"{err}\n{_missing(dataset, missing[i:])}") from err
    if check:
        for r, p in zip(remotes, paths):
            verify(p, r.url, r.name)
    return paths
