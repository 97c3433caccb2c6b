"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

A reader never sees half a file, an interrupted write (an exception, Ctrl-C, a full disk)
leaves the previous file in place, and the temporary is removed whatever happens. Every
writer in the library goes through ``atomic_path``: checkpoints, ONNX graphs, manifests,
the text-embedding cache, JSON outputs.

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
        os.replace(tmp, path)
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
