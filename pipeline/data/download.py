"""Download and safely extract the official CIFAR archives (md5-checked; no path may escape the root)."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from pathlib import Path

from pipeline.data.formats import FOLDERS, SPLIT_FILES, DataError

ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CHUNK = 1 << 20


def is_complete(name: str, root: Path) -> bool:
    """True when every file of the official folder exists under ``root``."""
    files = SPLIT_FILES[name]
    folder = Path(root) / FOLDERS[name]
    return all((folder / f).is_file() for f in [*files["train"], *files["test"], files["meta"]])


def fetch(url: str, dest: Path, md5: str) -> Path:
    """Stream ``url`` to ``dest`` while hashing; on an md5 mismatch delete the file and raise DataError."""
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, part.open("wb") as out:  # noqa: S310 - user URL
            while chunk := resp.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed ({exc}); partial file deleted") from None
    if digest.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"{dest.name}: md5 {digest.hexdigest()} != expected {md5} (download from {url} is corrupt); "
                        f"deleted the partial file {part}")
    part.replace(dest)
    return dest


def safe_extract(archive: Path, root: Path) -> None:
    """Extract a tar archive into ``root``, refusing links, devices and any member that escapes ``root``."""
    root = Path(root).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (root / m.name).resolve()
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: refused member {m.name!r} (only regular files and folders allowed)")
                if m.name.startswith(("/", "\\")) or not target.is_relative_to(root):
                    raise DataError(f"{archive}: refused member {m.name!r} (path escapes {root})")
            tar.extractall(root, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract ({type(exc).__name__}: {exc})") from None


def download(name: str, root: Path | str, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch ``name`` (cifar10/cifar100) into ``root`` unless already there; returns the data folder.

    ``url``/``md5`` default to the official archive and its checksum (override them for mirrors or tests).
    The archive is kept beside the folder so a re-run does not download again.
    """
    if name not in ARCHIVES:
        raise DataError(f"download: unknown data set {name!r} (expected one of {sorted(ARCHIVES)})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / FOLDERS[name]
    if is_complete(name, root):
        return folder
    official_url, official_md5 = ARCHIVES[name]
    url, md5 = url or official_url, md5 or official_md5
    archive = root / Path(url.split("?")[0]).name
    if not archive.is_file() or _md5(archive) != md5.lower():
        archive.unlink(missing_ok=True)
        fetch(url, archive, md5)
    safe_extract(archive, root)
    if not is_complete(name, root):
        raise DataError(f"{archive}: archive does not hold the official {FOLDERS[name]}/ files")
    return folder


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
