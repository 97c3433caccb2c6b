"""What ``regionclip label`` reads: image files, folders, globs, a text file of paths, a COCO
images file, and webdataset tar shards, expanded into one list in a deterministic order.

Each item is a path (``str``) or a ``TarMember``; its ``str`` is the key a shard records. The
order is the order of the specs, each expanded sorted, so the same command always cuts the same
shards. Paths listed inside a text or COCO file are kept even when missing: the run records
them as failures instead of silently dropping them; a spec on the command line that does not
exist is refused before anything runs.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import BadImage, BadInput
from ..io import IMAGE_EXTENSIONS, expand_inputs

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SEP = "::"  # tar path SEP member name: the key of an image inside a shard


@dataclass(frozen=True)
class TarMember:
    """One image inside a tar shard (webdataset layout: ``KEY.jpg`` beside ``KEY.json`` ...).

    ``offset``/``size`` locate its bytes in an uncompressed tar, so reading it is one seek
    (a gzipped tar is walked with ``tarfile`` instead). Picklable: DataLoader workers decode it.
    """

    tar: str
    name: str
    offset: int = -1
    size: int = -1

    def __str__(self) -> str:
        return f"{self.tar}{SEP}{self.name}"

    def read_bytes(self) -> bytes:
        try:
            if self.offset >= 0:
                with open(self.tar, "rb") as f:
                    f.seek(self.offset)
                    return f.read(self.size)
            with tarfile.open(self.tar) as t:
                member = t.extractfile(self.name)
                return member.read() if member is not None else b""
        except (OSError, KeyError, tarfile.TarError) as exc:
            raise BadImage(f"{self}: cannot read it from the tar ({type(exc).__name__})") from None

    def open_image(self):
        """A PIL image over the member's bytes (``regionclip.io.load_reduced`` decodes it)."""
        from PIL import Image, UnidentifiedImageError

        data = self.read_bytes()
        if not data:
            raise BadImage(f"{self}: file is empty")
        try:
            return Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"{self}: not a readable image ({type(exc).__name__})") from None


def tar_members(path: str | os.PathLike) -> list[TarMember]:
    """The image members of a tar shard, sorted by name."""
    path = str(path)
    try:
        with tarfile.open(path) as t:
            plain = path.endswith(".tar")
            found = [TarMember(path, m.name, m.offset_data if plain else -1, m.size if plain else -1)
                     for m in t.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS]
    except (OSError, tarfile.TarError) as exc:
        raise BadInput(f"{path}: not a readable tar file ({type(exc).__name__})") from None
    return sorted(found, key=lambda m: m.name)


def _listed(path: Path) -> Iterator[str]:
    """A text file of image paths, one per line (relative ones are relative to the file's folder),
    read as it is consumed."""
    try:
        with open(path) as f:
            for line in f:
                s = line.strip()
                if s and not s.startswith("#"):
                    yield str(path.parent / s) if not os.path.isabs(s) else s
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not a readable list of image paths ({type(exc).__name__})") from None


def _coco_images(path: Path) -> list[str]:
    """A COCO file's ``images[].file_name``, relative to the file's folder, in ``images`` order."""
    try:
        data = json.loads(path.read_text())
        names = [str(im["file_name"]) for im in data["images"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: expected a COCO file with images[].file_name ({type(exc).__name__})") from None
    return [n if os.path.isabs(n) else str(path.parent / n) for n in names]


def expand_sources(specs: Sequence[str | os.PathLike]) -> tuple[list, list[str]]:
    """``(items, problems)``: every image of ``specs`` in order, duplicates dropped (``iter_sources``
    as a list)."""
    problems: list[str] = []
    items = list(iter_sources(specs, problems))
    return items, problems


def iter_sources(specs: Sequence[str | os.PathLike], problems: list[str]) -> Iterator:
    """Every image of ``specs`` in order, duplicates dropped, expanded as it is consumed: a text
    list is read line by line, so the caller decides what to keep of it.

    A spec is an image file, a folder (its images, sorted), a glob, a ``.txt`` list of paths,
    a COCO ``.json`` (its ``images``), or a tar shard (``.tar``, ``.tar.gz``; globs of them too,
    e.g. ``shards/*.tar``). ``problems`` receives one line per pattern or folder that matched
    nothing, as the iteration meets it. A file given twice (relative and absolute, through a
    symlink) is kept once, as first spelled: what is remembered of each image to notice that is
    16 bytes of a hash of its real path. Raises ``BadInput`` at once naming every spec that does not
    exist (paths listed in a text or COCO file are kept even when missing: the run records them
    as failures).
    """
    specs = [str(spec) for spec in specs]
    missing = [spec for spec in specs if not Path(spec).exists() and not glob.has_magic(spec)]
    if missing:
        raise BadInput(_missing_message(missing))
    return _unique(_each(specs, problems))


def _each(specs: list[str], problems: list[str]) -> Iterator:
    for spec in specs:
        p = Path(spec)
        if p.is_file() and spec.endswith(TAR_SUFFIXES):
            yield from tar_members(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            yield from _listed(p)
        elif p.is_file() and p.suffix.lower() == ".json":
            yield from _coco_images(p)
        elif not p.exists() and spec.endswith(TAR_SUFFIXES):  # a glob of tar shards
            tars = sorted(glob.glob(spec))
            if not tars:
                problems.append(f"{spec}: pattern matched no tar shards")
            for t in tars:
                yield from tar_members(t)
        else:
            paths, missed = expand_inputs([spec])
            problems += missed
            yield from (str(q) for q in paths)


def _unique(items: Iterator) -> Iterator:
    seen: set[bytes] = set()
    for it in items:
        key = hashlib.blake2b(_same_file_key(it).encode("utf-8", "surrogateescape"), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            yield it


def _same_file_key(item) -> str:
    """One key for every spelling of a file (relative, absolute, through a symlink)."""
    if isinstance(item, TarMember):
        return f"{os.path.realpath(item.tar)}{SEP}{item.name}"
    return os.path.realpath(item)


def _missing_message(missing: list[str]) -> str:
    named = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = ""
    if any(not Path(m).suffix for m in missing):  # words, not file names: a --labels list the shell split
        hint = ' (words of an unquoted --labels list? quote it: --labels "red circle,blue square")'
    return f"no such file or directory: {named}{hint}"
