"""Atomic file writes: a temporary file beside the target, fsync, ``os.replace``, fsync of the folder.

A reader never sees half a file, an interrupted write (an exception, Ctrl-C, a full disk, a
crash of the machine) leaves the previous file in place, and the temporary is removed whatever
happens. Every writer in the library goes through ``atomic_path``: checkpoints, ONNX graphs,
manifests, the text-embedding cache, JSON outputs.

Files get the permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask),
not the ``0600`` of ``tempfile``. Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import BadOutput


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` to the disk. A folder cannot be opened for this on Windows (nor on some
    network file systems): there the rename's durability is the file system's."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (created if missing); write it in the block.

    On leaving the block normally the temporary replaces ``path``; on any exception it is
    removed and the exception goes on. ``OSError``s become ``BadOutput`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise BadOutput(f"cannot write {path} ({exc.strerror or exc})") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        _fsync(tmp)  # the bytes reach the disk before the name does: a crash leaves the old file, not an empty one
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)  # and the rename itself survives a crash
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise BadOutput(f"cannot write {path} ({exc.strerror or exc})") from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
