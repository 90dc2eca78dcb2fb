"""The gateway's build cache: where it is, how its folders are named, how a build lands there.

A folder's name is a digest of what determines its contents; a build is made in a scratch folder
beside it and renamed into place, so a folder exists only complete, and two processes building the
same thing at once both end with the one folder (the second rename finds it there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Files up to this size are identified by their content; larger ones (a big model's weight shards)
# by size and modification time, so that a restart does not read gigabytes to find its cache entry.
CONTENT_LIMIT = 64 * 1024 * 1024


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/ensemble-gateway (~/.cache/ensemble-gateway)."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "ensemble-gateway"


def tree_fingerprint(path: str) -> str:
    """A digest of the files under ``path``: names, sizes, and contents (size and mtime above ``CONTENT_LIMIT``)."""
    h = hashlib.sha256()
    root = Path(os.path.expanduser(path))
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0".encode())
        if st.st_size > CONTENT_LIMIT:
            h.update(str(st.st_mtime_ns).encode())
            continue
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` (same file system, so ``publish`` can rename from it), removed after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(built: Path, out: Path, marker: str) -> None:
    """Move a finished build into place; if another process got there first (``out/marker`` exists, the
    same content by its name), keep theirs."""
    try:
        built.rename(out)
    except OSError:
        if not (out / marker).exists():
            raise
