"""Concept pools: the phrases a caption can mention, and which of them each caption does mention.

Region-concept pretraining labels an image's region proposals only with concepts its captions
name, so a pool is matched against every caption of the training set. Matching rules:

- case-insensitive, on word boundaries: "cat" does not match "concatenate", "scar" not "square";
- the LAST word may take a simple plural: ``s``; ``es`` after s, x, z, ch, sh, o ("boxes");
  consonant + y -> ``ies`` ("puppies"). Nothing else ("knives" does not match "knife");
- words of a multi-word concept may be separated in the text by any run of whitespace, hyphens or
  underscores ("teddy-bear", "teddy bear"); in the concept, underscores and hyphens separate
  words too, so LVIS's "teddy_bear" matches;
- a trailing parenthesised qualifier is not looked for in the text: LVIS's "bow_(weapon)" matches
  "bow" (as does "bow_(decorative_ribbons)": captions cannot tell them apart);
- a concept also matches when it is part of a longer concept that matched: with both "circle" and
  "red circle" in the pool, "a red circle" matches both. Captions that say "red circle" do show
  a circle, and a pseudo-labeller that wants only the most specific concept can drop the
  shorter one itself, whereas one that is never told about "circle" cannot add it back.

Each concept is one regular expression, compiled once. Running all 1203 LVIS expressions over
every caption takes minutes (measured: 100,000 captions, ~280 s), so a word index picks the
few concepts whose first word occurs in a caption and only their expressions run: the same
100,000 captions (9-17 words, one LVIS name each) take 1.4-2.0 s on one core of a shared
AMD EPYC (Python 3.11), the pool 0.15 s to build. The index only narrows, never decides: its
answers equal the expressions' own (checked on 2,000 of those captions).
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from .errors import BadAnnotations, BadConfig

# Separators between a concept's words: in the concept, and what may stand for them in the text.
_CONCEPT_SEPARATORS = re.compile(r"[\s_\-]+")
_TEXT_SEPARATOR = r"[\s_\-]+"
_QUALIFIER = re.compile(r"[\s_]*\([^()]*\)\s*$")
# Index tokens exclude "_" so they split where _TEXT_SEPARATOR does (\w alone would not).
_TOKEN = re.compile(r"[^\W_]+")
_ES_ENDINGS = ("s", "x", "z", "ch", "sh", "o")


def _forms(word: str) -> list[str]:
    """``word`` and its simple plurals, in the word's own spelling."""
    if not word[-1:].isalpha():
        return [word]  # "r2d2", "7-up's": no plural rule fits
    lower = word.lower()
    if lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        return [word, word[:-1] + "ies"]
    if lower.endswith(_ES_ENDINGS):
        return [word, word + "es", word + "s"]  # "potatoes" and "pianos" both exist
    return [word, word + "s"]


def _words(name: str) -> list[str]:
    """The words a concept name is matched by: qualifier dropped, split at separators."""
    core = _QUALIFIER.sub("", name).strip() or name  # a name that is all qualifier keeps it
    return [w for w in _CONCEPT_SEPARATORS.split(core) if w]


class ConceptPool:
    """An ordered list of concept phrases and a matcher that finds them in captions.

    Args:
        names: concept phrases (e.g. category names), in the order indices refer to. Exact
            duplicates (after stripping surrounding whitespace) are dropped, keeping the first.

    Raises:
        BadConfig: an empty list, a blank or non-string name.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise BadConfig(f"concepts must be a list of phrases, but got {type(names).__name__} {str(names)[:60]!r}")
        names = list(names)
        if not names:
            raise BadConfig("the concept list is empty; give at least one phrase (e.g. the category names)")
        for k, name in enumerate(names):
            if not isinstance(name, str) or not _TOKEN.search(name):
                raise BadConfig(f"concept {k} is {name!r}; every concept must be a phrase with a letter or digit")
        self.names: list[str] = list(dict.fromkeys(n.strip() for n in names))
        self._patterns: list[re.Pattern[str]] = []
        self._index: dict[str, list[int]] = {}
        self._unindexed: list[int] = []
        for i, name in enumerate(self.names):
            words = _words(name)
            forms = _forms(words[-1])
            last = "(?:" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + ")"
            body = _TEXT_SEPARATOR.join([re.escape(w) for w in words[:-1]] + [last])
            self._patterns.append(re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE))
            # A match contains the first token of the first word; of a one-word concept, that
            # token may carry the plural ending, so each form's first token is a key.
            keys = {m.group().lower() for f in (forms if len(words) == 1 else words[:1])
                    if (m := _TOKEN.search(f))}
            for key in keys:
                self._index.setdefault(key, []).append(i)
            if not keys:
                self._unindexed.append(i)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ConceptPool({len(self.names)} concepts: {', '.join(self.names[:5])}{', ...' if len(self) > 5 else ''})"

    def match(self, text: str) -> list[int]:
        """Indices into ``names`` of the concepts ``text`` mentions, sorted ascending (rules: module docstring)."""
        candidates = set(self._unindexed)
        for token in set(_TOKEN.findall(text.lower())):
            candidates.update(self._index.get(token, ()))
        return sorted(i for i in candidates if self._patterns[i].search(text))

    def image_concepts(self, captions: Iterable[str]) -> list[int]:
        """Indices of the concepts any of one image's ``captions`` mentions, sorted ascending."""
        found: set[int] = set()
        for caption in captions:
            found.update(self.match(caption))
        return sorted(found)


def _names_from_file(path: Path) -> list[str]:
    """Concept names from a text, YAML or COCO JSON file, by suffix."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadConfig(f"{path}: cannot read the concept file ({exc})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadConfig(f"{path}: not valid JSON ({exc}); expected a COCO instances file") from None
        if isinstance(data, list):
            return data
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
            raise BadConfig(f"{path}: no 'categories' list with 'id' and 'name'; expected a COCO instances file")
        return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BadConfig(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if isinstance(data, list) or data is None:
            return data or []
        from .data.splits import load_split  # a mapping is a split file: reuse its checks

        try:
            split = load_split(path)
        except BadAnnotations as exc:
            raise BadConfig(str(exc)) from None
        return split["base"] + split["novel"]
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def load_concepts(spec: Sequence[str] | str | os.PathLike) -> ConceptPool:
    """A concept pool from a list of phrases or a file.

    Args:
        spec: a list of phrases, or a path to one of
            - a ``.json`` COCO instances file: its category names, by category id (a JSON list of
              names works too);
            - a ``.yaml``/``.yml`` split file: ``base`` then ``novel`` names, as
              ``configs/splits/shapes.yaml`` (a YAML list of names works too);
            - any other file: text, one phrase per line; ``#`` starts a comment, blank lines are
              skipped.

    Raises:
        BadConfig: the file is missing or unreadable, or yields no concepts; a blank name.
    """
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise BadConfig(
                f"{path}: concept file not found; pass a text file (one phrase per line), a split "
                "YAML, a COCO instances JSON, or a list of phrases"
            )
        names = _names_from_file(path)
        if not names:
            raise BadConfig(f"{path}: the concept list is empty; give at least one phrase")
        return ConceptPool(names)
    return ConceptPool(spec)
