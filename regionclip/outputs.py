"""Output paths: checked before any work starts, written atomically when the work is done.

A run that takes minutes must not fail at the end because ``--json`` names a folder or a
read-only place. Commands call ``check_output_file``/``check_output_dir`` first, then write
with ``atomic_write_*`` (``regionclip.atomic``, re-exported here): a temporary file in the
target's folder and ``os.replace``, so a reader never sees half a file and an interrupted write
leaves the old file in place. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .atomic import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported)
from .errors import BadOutput

# Extensions an annotated copy keeps (Pillow and OpenCV both write these); others get .jpg appended.
WRITABLE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a ``mkdir -p`` would start from)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, target: Path, what: str, as_file: bool) -> None:
    """Create and remove a scratch file (``as_file``) or folder in ``folder``.

    ``os.access`` says yes to root on read-only mounts and virtual file systems such as /proc;
    creating something is the only test that tells.
    """
    if not folder.is_dir():
        raise BadOutput(f"{what} {target}: {folder} is a file, not a folder")
    try:
        if as_file:
            fd, scratch = tempfile.mkstemp(prefix=".regionclip-probe-", dir=folder)
            os.close(fd)
            os.unlink(scratch)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".regionclip-probe-", dir=folder))
    except OSError as exc:
        kind = "files" if as_file else "folders"
        raise BadOutput(f"{what} {target}: cannot create {kind} in {folder} ({exc.strerror or exc})") from None


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that a file can be written at ``path`` without writing it; returns ``Path(path)``.

    The path must not be an existing folder, and its folder must exist and be writable or be
    creatable (no file in the way, a writable ancestor). Nothing is left behind.

    Raises:
        BadOutput: naming the path and why it cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise BadOutput(f"{what} {path} is a folder; give a file name, e.g. {path / 'out.json'}")
    target = Path(os.path.abspath(path))
    folder = _nearest_existing(target.parent)
    _probe(folder, path, what, as_file=folder == target.parent)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check that ``path`` is, or can be created as, a writable folder; returns ``Path(path)``.

    Nothing is created (the folder appears when the first file is written).

    Raises:
        BadOutput: ``path`` or an ancestor is a file, or nothing can be created there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadOutput(f"{what} {path} is a file, not a folder; give a folder path")
    target = Path(os.path.abspath(path))
    folder = _nearest_existing(target)
    # A file inside an existing target folder; otherwise a sub-folder of the closest ancestor.
    _probe(folder, path, what, as_file=folder == target)
    return path


def json_safe(value: Any) -> Any:
    """Plain JSON types: NaN/inf become None, numpy/torch scalars and arrays become Python values."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch, scalars and arrays alike
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``json_safe(obj)`` as JSON (NaN becomes ``null``, so strict readers accept it), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def relative_paths(inputs: Sequence[str | os.PathLike]) -> tuple[Path, list[Path]]:
    """The inputs' common parent folder (absolute) and each input's path relative to it.

    What tells inputs apart in printed tables: ``a/x.jpg`` and ``b/x.jpg`` stay distinct,
    while inputs from one folder show their base names.
    """
    absolute = [Path(os.path.abspath(p)) for p in inputs]
    if not absolute:
        return Path(os.path.abspath(".")), []
    parent = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return parent, [p.relative_to(parent) for p in absolute]


def annotated_paths(inputs: Sequence[str | os.PathLike], save_dir: str | os.PathLike) -> list[Path]:
    """Where ``--save-dir`` puts the annotated copy of each input, in input order.

    The layout mirrors the inputs' folders below their common parent folder
    (``relative_paths``), so ``a/x.jpg`` and ``b/x.jpg`` become ``SAVE/a/x.jpg`` and
    ``SAVE/b/x.jpg``; inputs from one folder land directly in ``SAVE``. The extension is kept
    when it is a common writable one (a PNG stays PNG); anything else gets ``.jpg`` appended
    (``x.gif`` -> ``x.gif.jpg``). Two inputs never share a target (a clash left over gets
    ``-2``, ``-3`` before the extension).

    Raises:
        BadOutput: a target would overwrite one of the inputs (``save_dir`` is the inputs' folder).
    """
    _, relative = relative_paths(inputs)
    save_dir = Path(save_dir)
    targets: list[Path] = []
    taken: set[Path] = set()
    for rel in relative:
        name = rel.name if rel.suffix.lower() in WRITABLE_IMAGE_EXTENSIONS else rel.name + ".jpg"
        target = save_dir / rel.parent / name
        n = 1
        while target in taken:  # only "x.gif" beside a literal "x.gif.jpg" gets here
            n += 1
            target = save_dir / rel.parent / f"{Path(name).stem}-{n}{Path(name).suffix}"
        taken.add(target)
        targets.append(target)
    sources = {Path(os.path.abspath(p)): p for p in inputs}
    for target in targets:
        source = sources.get(Path(os.path.abspath(target)))
        if source is not None:
            raise BadOutput(
                f"the annotated copy of an input would overwrite input {source}; choose a save folder "
                "outside the input folders"
            )
    return targets
