"""Image loading and input expansion: everything becomes an HxWx3 uint8 RGB array.

``load_image`` gives the full resolution; ``load_reduced`` decodes only what the model's stages
need (JPEG draft mode, then a resize right after decoding) and remembers the original size, so
boxes can still come back in original pixels.

Importing it does not import torch: a process that only decodes (the Ray engine's decoding
tasks) starts in a fraction of a second instead of the seconds torch's import takes, and a tensor
can only be passed in where torch is already loaded.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# Pillow refuses images above ~179 MP as a decompression-bomb guard; detection photos from
# gigapixel cameras and scanners are legitimate, and draft decoding keeps their memory small.
Image.MAX_IMAGE_PIXELS = 1_000_000_000
# Only JPEG decodes reduced (draft mode): any other format decodes whole, 3 bytes a pixel and
# more while Pillow works. Above this many pixels such a file is refused with one line instead
# of taking the machine's memory (a 1-gigapixel PNG: over 3 GB). The environment variable raises it.
MAX_PIXELS_ENV = "REGIONCLIP_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 120_000_000


def max_full_decode_pixels() -> int:
    """The pixel budget for images that must decode at full size (``REGIONCLIP_MAX_PIXELS``)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        return int(float(raw)) if raw.strip() else DEFAULT_MAX_PIXELS
    except ValueError:
        raise BadImage(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels, e.g. 500000000") from None


@dataclass(frozen=True)
class LoadedImage:
    """Decoded pixels (HxWx3 uint8 RGB, possibly reduced) and the (h, w) of the original image."""

    pixels: np.ndarray
    original_size: tuple[int, int]


ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, "torch.Tensor", LoadedImage]


def expand_inputs(specs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Expand files, directories (non-recursive, image extensions) and globs into paths.

    Returns ``(paths, problems)``: ``problems`` holds one message per spec that matched no
    image, so a batch can report them and go on. Order is stable (sorted within a spec); a file
    named twice, under any spelling, comes once.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not found:
                problems.append(f"{spec}: directory has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(spec):
            found = sorted(Path(q) for q in glob.glob(spec) if Path(q).suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{spec}: pattern matched no images")
            paths.extend(found)
        else:
            problems.append(f"{spec}: no such file or directory")
    seen: set[str] = set()  # one file under two spellings (relative and absolute, a symlink) is one input
    unique = [q for q in paths if not (os.path.realpath(q) in seen or seen.add(os.path.realpath(q)))]
    return unique, problems


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        # Copied out in strips: exif_transpose and convert copy even when there is nothing to do,
        # and numpy reads a whole PIL image through one bytes object (a copy of its own). A
        # 6000x6000 JPEG decoded whole for tiling rose 619 MB above the process's RSS, 273 MB now.
        w, h = img.size
        out = np.empty((h, w, 3), np.uint8)
        step = max(1, (1 << 22) // max(w, 1))  # rows of about 4 MP at a time
        for y in range(0, h, step):
            out[y:y + step] = np.asarray(img.crop((0, y, w, min(h, y + step))))
        return out
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the real range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        # Transparent pixels become white rather than whatever colour hides behind alpha 0.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    # np.array copies into a writable array (np.asarray of a PIL image is read-only, and
    # torch.from_numpy warns on those).
    return np.array(img.convert("RGB"), dtype=np.uint8)


# What Pillow raises for a file that is not (or not wholly) an image; the bomb error is past twice
# MAX_IMAGE_PIXELS, raised from the header.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise BadImage(f"{path}: no such file")
    if path.is_dir():
        raise BadImage(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise BadImage(f"{path}: file is empty")
    try:
        return Image.open(path)
    except _DECODE_ERRORS as exc:
        raise BadImage(f"{path}: not a readable image ({type(exc).__name__})") from None


def _check_budget(path, img: Image.Image) -> None:
    """Refuse, from the header, an image that would decode whole above ``max_full_decode_pixels``."""
    w, h = img.size
    budget = max_full_decode_pixels()
    if w * h > budget:
        raise BadImage(f"{path}: {w}x{h} ({w * h / 1e6:.0f} MP) {img.format or 'image'} is above the "
                       f"{budget / 1e6:.0f} MP that decode at full size (only JPEGs decode reduced); "
                       f"raise it with {MAX_PIXELS_ENV}=N or pass a smaller or JPEG copy")


def header_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be decoded, from its header alone (no pixel is decoded); None when it
    opens as an image within the pixel budget (JPEGs decode reduced, so any size passes). A file
    that passes can still fail to decode later (a truncated body)."""
    try:
        with _open(Path(path)) as img:
            if img.format != "JPEG":
                _check_budget(path, img)
    except BadImage as exc:
        return str(exc)
    return None


def image_size(source) -> tuple[int, int]:
    """The (h, w) a path or archive member (``open_image``) decodes to, EXIF rotation included,
    from its header: no pixel is decoded. ``BadImage`` when it does not open as an image."""
    try:
        img = source.open_image() if hasattr(source, "open_image") else _open(Path(source))
        with img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations that swap the axes
                h, w = w, h
    except _DECODE_ERRORS as exc:
        raise BadImage(f"{source}: not a readable image ({type(exc).__name__})") from None
    return int(h), int(w)


def _decode(path: Path, max_side: int | None, opened: Image.Image | None = None) -> LoadedImage:
    """Decode ``path`` (or ``opened``, an image ``path`` names); with ``max_side``, JPEGs decode at the
    smallest 1/2^k scale still at least that large (Pillow's draft mode), so a 100-megapixel photo
    never exists in memory."""
    img = _open(path) if opened is None else opened
    try:
        with img:
            w, h = img.size
            jpeg_draft = max_side is not None and max(w, h) > max_side and img.format == "JPEG"
            if not jpeg_draft:
                _check_budget(path, img)  # from the header, before any pixel decodes
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations that swap the axes
                h, w = w, h
            if jpeg_draft:
                scale = max_side / max(w, h)
                img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
            img.load()
            pixels = _pil_to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise BadImage(f"{path}: not a readable image ({type(exc).__name__})") from None
    return LoadedImage(pixels, (h, w))


def reduce(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink HxWx3 uint8 so its longer side is at most ``max_side`` (area interpolation)."""
    h, w = pixels.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def load_reduced(source: ImageSource, max_side: int | None = None) -> LoadedImage:
    """Load any ``ImageSource`` with its longer side at most ``max_side`` (None: full size).

    The original (h, w) is kept, so callers can map boxes back to original pixels.
    """
    if isinstance(source, LoadedImage):
        return LoadedImage(reduce(source.pixels, max_side), source.original_size)
    if isinstance(source, (str, os.PathLike)):
        loaded = _decode(Path(source), max_side)
        return LoadedImage(reduce(loaded.pixels, max_side), loaded.original_size)
    if hasattr(source, "open_image"):  # a file inside an archive (regionclip.label.sources.TarMember)
        loaded = _decode(Path(str(source)), max_side, source.open_image())
        return LoadedImage(reduce(loaded.pixels, max_side), loaded.original_size)
    pixels = load_image(source)
    return LoadedImage(reduce(pixels, max_side), pixels.shape[:2])


def load_image(source: ImageSource) -> np.ndarray:
    """Load a path, PIL image, HxWx3 / HxW array or CHW / HxWx3 tensor as HxWx3 uint8 RGB.

    Float arrays and tensors are taken as values in [0, 1]. Raises ``BadImage`` for missing,
    empty, corrupt or unreadable files and for arrays of the wrong shape.
    """
    if isinstance(source, LoadedImage):
        return source.pixels
    if isinstance(source, (str, os.PathLike)):
        return _decode(Path(source), None).pixels
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    torch = sys.modules.get("torch")  # without it loaded, nothing is a tensor
    if torch is not None and isinstance(source, torch.Tensor):
        t = source.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        source = t.numpy()
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise BadImage(f"image array must be HxW, HxWx3 or HxWx4, but got shape {source.shape}")
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        if np.issubdtype(arr.dtype, np.floating):
            return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if arr.dtype == np.uint16:
            return (arr.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
        raise BadImage(f"unsupported image array dtype {arr.dtype}")
    raise BadImage(f"unsupported image input of type {type(source).__name__}")


def to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1] on ``device`` (converted there, not on the host)."""
    import torch

    t = torch.from_numpy(image if image.flags.writeable else image.copy()).to(device, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)


def decode(source, max_side: int | None, tiling=None) -> tuple[LoadedImage | None, str | None]:
    """``(loaded, None)``, or ``(None, why)`` for a source that cannot be decoded: what the
    predictor's workers do to each source (``max_side``: the backend's ``input_max_side``), and a
    pipeline that decodes in a stage of its own. With ``tiling`` (a ``tiles.Tiling``, which this
    module does not import) an image larger than a window is only opened (``Tiling.load``)."""
    try:
        return (tiling.load if tiling is not None else load_reduced)(source, max_side), None
    except BadImage as exc:
        return None, str(exc)
