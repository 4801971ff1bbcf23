"""Where a command writes: checked once, at its start, so an unusable location is one line naming the option and
the path, before a model loads or anything is half-written.

A location is usable when it is not the other kind of thing (a folder where a file goes, a file where a folder
goes), and the nearest part of it that exists is a folder this process may write into.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlm_mig.data.schema import DataError


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def check_output(path: str | os.PathLike, option: str, *, folder: bool) -> Path:
    """``path`` as a ``Path`` if a command can write there (a folder when ``folder``, else a file); a
    ``DataError`` naming ``option`` and the path otherwise. Nothing is created."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise DataError(f"{option} {p}: is a file, not a folder")
    if not folder and p.is_dir():
        raise DataError(f"{option} {p}: is a folder; give a file path")
    base = _nearest_existing(p if folder else p.parent)
    if not base.is_dir():
        raise DataError(f"{option} {p}: {base} is a file, so nothing can be written under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DataError(f"{option} {p}: {base} is not writable")
    return p
