"""Writing files so that a reader never sees half of one (write a temporary file beside the
target, then rename it over the target: atomic on POSIX), and the cache of downloaded weights."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.error
from pathlib import Path
from typing import Callable

from core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1) + "\n")


def cache_dir() -> Path:
    """The studio's cache folder (encoder weights, unpacked models, compiled kernels); STUDIO_CACHE moves it."""
    return Path(os.environ.get("STUDIO_CACHE", Path.home() / ".cache" / "llama-adapter-studio"))


def cached_file(file: str, url: str | None, missing: Callable[[str], Exception], sha256: str | None = None) -> Path:
    """cache_dir() / file: the cached copy, else downloaded from `url` (None: no download) with a
    progress bar, into a temporary file renamed when complete. Its SHA-256 must equal `sha256` where
    the publisher states one; else the digest is recorded beside it and checked on later loads.
    `missing(reason)` is the error raised when there is no file."""
    cached = cache_dir() / file
    if cached.is_file():
        _check_digest(cached, sha256)
        return cached
    if not url:
        raise missing("none were found")
    from torch.hub import download_url_to_file
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(cached), progress=True)  # writes a temporary file, then moves it
    except (urllib.error.URLError, OSError) as e:
        raise missing(f"the download failed ({str(e)[:100]})") from None
    digest = _digest(cached)
    if sha256 and digest != sha256:
        cached.unlink()
        raise missing(f"the download's SHA-256 is {digest[:12]}..., not the published {sha256[:12]}...")
    cached.with_suffix(".sha256").write_text(digest + "\n")
    return cached


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _check_digest(path: Path, expected: str | None = None):
    recorded = path.with_suffix(".sha256")
    expected = expected or (recorded.read_text().strip() if recorded.is_file() else None)
    if expected and _digest(path) != expected:
        raise UserError(f"{path}: its SHA-256 differs from the one published or recorded at download; "
                        "delete it to download again")
