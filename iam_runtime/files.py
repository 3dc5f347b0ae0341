"""Writing files so that a crash never leaves one that looks complete: the content goes to a
temporary name in the same folder and is renamed over the target only once it is whole. Every
writer of the project (outputs, manifests, configs, checkpoints, datasets, reports) uses this."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """``.<name>.<pid>.tmp`` beside ``path``: hidden, unique per process, recognisable."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", sync: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` (after an fsync when
    ``sync``), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, sync: bool = False) -> None:
    with atomic_write(path, "wb", sync) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, sync: bool = False) -> None:
    with atomic_write(path, "w", sync) as f:
        f.write(text)


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files an interrupted run left under ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.rglob(f".*{TEMPORARY_SUFFIX}"):
            tmp.unlink(missing_ok=True)
