"""Captions for the shapes images: phrasings that name every shape with its count, the way
people write COCO Captions (``shapes.make_shapes`` writes them beside the boxes)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

# Caption phrasings. {objects} lists every shape with its count; {background} is a tone word
# that is never a target colour, so no caption names a category the image does not hold.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {background} background",
    "there {be} {objects}",
    "an image with {objects}",
    "a picture showing {objects}",
    "a {background} background with {objects}",
    "{objects}",
    "a drawing of {objects} on a {background} background",
    "a photo of {objects}",
)
EMPTY_CAPTION_TEMPLATES: tuple[str, ...] = (
    "an empty background with no shapes",
    "a plain {background} background",
    "there are no shapes in this image",
    "an image of an empty {background} background",
    "nothing but a {background} background",
)
_COUNT_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _plural(name: str) -> str:
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and len(name) > 1 and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def _counted(name: str, count: int) -> str:
    """``"a red circle"``, ``"two red circles"``."""
    if count == 1:
        return ("an " if name[0] in "aeiou" else "a ") + name
    return f"{_COUNT_WORDS[count] if count < len(_COUNT_WORDS) else count} {_plural(name)}"


def background_word(rgb: np.ndarray) -> str:
    """A tone word for an image's background, from the median luminance of its outer pixels.

    Shapes are placed at least a pixel inside the border, so the frame is background (and some
    clutter, which the median ignores).
    """
    frame = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)
    luminance = float(np.median(frame @ np.array([0.299, 0.587, 0.114], np.float32)))
    return "dark grey" if luminance < 95 else "light grey" if luminance > 165 else "grey"


def shape_captions(
    names: Sequence[str], rng: np.random.Generator, n: int = 5, background: str = "grey"
) -> list[str]:
    """``n`` captions for one image holding the shapes ``names``.

    Args:
        names: one entry per shape (repeats are counted: two "red circle" -> "two red circles").
        rng: the generator the phrasing, the order of the shapes and the capitals come from.
        n: how many captions; the templates are used in a random order, each once before any
            repeats.
        background: a tone word for the background (it must not be a shape colour).

    Returns:
        Captions that each name every distinct shape in ``names`` (its name, or its plural with
        a count), in a shuffled order; with no shapes, captions that name none.
    """
    counts = Counter(names)
    templates = CAPTION_TEMPLATES if counts else EMPTY_CAPTION_TEMPLATES
    rounds = -(-n // len(templates))
    order = [int(t) for _ in range(rounds) for t in rng.permutation(len(templates))][:n]
    captions = []
    for t in order:
        groups = list(counts.items())
        groups = [groups[int(j)] for j in rng.permutation(len(groups))]
        phrases = [_counted(name, count) for name, count in groups]
        objects = " and ".join([", ".join(phrases[:-1]), phrases[-1]] if len(phrases) > 1 else phrases)
        be = "is" if groups and groups[0][1] == 1 else "are"
        text = templates[t].format(objects=objects, background=background, be=be)
        if rng.random() < 0.5:  # half as a sentence, as people write them in COCO Captions
            text = text[0].upper() + text[1:] + "."
        captions.append(text)
    return captions
