"""Vocabularies: classes as data (a ``--vocab`` file), and label embeddings stored in a file.

``Vocabulary`` holds classes with prompts (synonyms), exemplars (``IMAGE:x1,y1,x2,y2`` boxes),
negatives and per-class thresholds, read from YAML (``from_yaml``), a dict, plain labels or a
command's flags (``resolve``) and checked whole (exemplar boxes against their image's header)
before any model loads; ``exemplars.compile_vocabulary`` embeds it. docs/vocabulary.md.

Concept files: the text tower is one source of label embeddings (``text.TextEncoder``); a file
written once is another (``--text-embeddings``, ``text_embeddings=``): RegionCLIP's
``coco_65_cls_emb.pth`` holds the 65 OV-COCO names through its 81-template ensemble,
un-normalised. Rows are checked against the labels (one per label, in order) and the model's
embedding width.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from .errors import BadInput, WeightsUnavailable
from .io import load_reduced


def _read(path: Path):
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"{path}: cannot be read as a torch tensor file ({type(exc).__name__}); "
                                 "expected a concept-embedding tensor (N, D) such as coco_65_cls_emb.pth") from None


def load_concept_embeddings(source: str | os.PathLike | torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """A concept-embedding file (or tensor) -> (N, D) float32 rows, unit-norm with ``normalize``.

    RegionCLIP stores un-normalised means and normalises them whenever it scores, so unit rows
    lose nothing. A ``(D,)`` tensor is one concept (RegionCLIP squeezes one-name files).
    """
    where = "text embeddings" if isinstance(source, torch.Tensor) else str(source)
    obj = source if isinstance(source, torch.Tensor) else _read(Path(source))
    if not isinstance(obj, torch.Tensor):
        raise WeightsUnavailable(
            f"{where}: this holds a {type(obj).__name__}, expected a concept-embedding tensor (N, D) such as "
            "coco_65_cls_emb.pth"
        )
    if obj.ndim == 1:
        obj = obj[None]
    if obj.ndim != 2 or not obj.is_floating_point() or 0 in obj.shape:
        raise WeightsUnavailable(
            f"{where}: concept embeddings must be a float tensor of shape (N, D), but got "
            f"{obj.dtype} {tuple(obj.shape)}"
        )
    emb = obj.float()
    norms = emb.norm(dim=1)
    bad = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten()
    if len(bad):
        raise WeightsUnavailable(f"{where}: row {int(bad[0])} of the concept embeddings is zero or not finite")
    return F.normalize(emb, dim=1) if normalize else emb


def check_concept_embeddings(emb: torch.Tensor, labels: Sequence[str], embed_dim: int | None,
                             where: str = "text embeddings") -> torch.Tensor:
    """Raise ``BadInput`` (one line) unless ``emb`` has one row per label and ``embed_dim`` columns
    (``None``: any; the count can be checked before a model is built)."""
    if len(emb) != len(labels):
        raise BadInput(
            f"{where} hold {len(emb)} embeddings but {len(labels)} labels were given: the labels file "
            "must list the names of the embedding file, one per line, in its order"
        )
    if embed_dim is not None and emb.shape[1] != embed_dim:
        raise BadInput(
            f"{where} have dimension {emb.shape[1]} but the CLIP model embeds to {embed_dim} "
            "(RN50: 1024, the plain *_cls_emb.pth files; RN50x4: 640, the *_rn50x4.pth files)"
        )
    return emb


def concept_vocabulary(source: str | os.PathLike | torch.Tensor, labels: Sequence[str],
                       embed_dim: int | None = None) -> torch.Tensor:
    """``load_concept_embeddings`` + ``check_concept_embeddings``: (L, D) unit rows for ``labels``."""
    where = "text embeddings" if isinstance(source, torch.Tensor) else f"text embeddings {source}"
    return check_concept_embeddings(load_concept_embeddings(source), labels, embed_dim, where)


# ----------------------------------------------------------------------------- vocabulary files
# How a class's text and exemplars combine: each side is a unit vector (the prompts' ensemble,
# the exemplars' mean, each normalised), the class is normalise((1 - w) * text + w * exemplars).
# 0.5 weighs a picture of the thing as much as its name; a class with only one side uses it alone.
EXEMPLAR_WEIGHT = 0.5

_CLASS_KEYS = ("prompts", "exemplars", "negatives", "threshold")


@dataclass(frozen=True)
class Exemplar:
    """An example of a class: ``image`` (a path, or any ``io.ImageSource``) and ``box_xyxy`` in
    its original pixels; or a precomputed unit-norm ``embedding`` (D,) (then no image)."""

    image: Any = None
    box_xyxy: tuple[float, float, float, float] | None = None
    embedding: Any = None

    @classmethod
    def parse(cls, spec: str, root: str | os.PathLike | None = None, where: str = "exemplar") -> Exemplar:
        """``"IMAGE:x1,y1,x2,y2"`` (IMAGE relative to ``root`` unless absolute) -> ``Exemplar``."""
        path, sep, box = str(spec).rpartition(":")
        try:
            coords = tuple(float(v) for v in box.split(","))
        except ValueError:
            coords = ()
        if not sep or not path or len(coords) != 4:
            raise BadInput(f"{where} {spec!r}: write IMAGE:x1,y1,x2,y2 (pixels of the image), "
                           "e.g. ref/hydrant.jpg:120,40,260,300")
        p = Path(path).expanduser()
        return cls(p if root is None or p.is_absolute() else Path(root) / p, coords)

    def check(self, where: str) -> None:
        """``BadInput`` for an empty box, a box outside its image or a missing image file; reads
        only the image's header."""
        if self.embedding is not None:
            return
        if self.box_xyxy is None or len(self.box_xyxy) != 4:
            raise BadInput(f"{where}: an exemplar needs a box x1,y1,x2,y2")
        x1, y1, x2, y2 = self.box_xyxy
        if not (x2 > x1 and y2 > y1):
            raise BadInput(f"{where}: the box {x1:g},{y1:g},{x2:g},{y2:g} is empty (x2 > x1 and y2 > y1 are needed)")
        h, w = _image_size(self.image, where)
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise BadInput(f"{where}: the box {x1:g},{y1:g},{x2:g},{y2:g} is outside the {w}x{h} image "
                           f"{self.image if isinstance(self.image, (str, os.PathLike)) else ''}".rstrip())

    def key(self) -> str:
        """What the exemplar cache keys this exemplar by: the image file's content and the box."""
        data = Path(self.image).read_bytes() if isinstance(self.image, (str, os.PathLike)) else np.asarray(
            load_reduced(self.image).pixels).tobytes()
        return hashlib.sha256(data).hexdigest()[:20] + ":" + ",".join(f"{v:g}" for v in self.box_xyxy)

    def to_manifest(self) -> dict:
        if self.embedding is not None:
            return {"embedding": [round(float(v), 6) for v in np.asarray(self.embedding).reshape(-1)]}
        image = str(self.image) if isinstance(self.image, (str, os.PathLike)) else "<array>"
        return {"image": image, "box_xyxy": [float(v) for v in self.box_xyxy]}


def _image_size(image, where: str) -> tuple[int, int]:
    """(h, w) of an image source; a file's from its header (EXIF rotation applied)."""
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise BadInput(f"{where}: exemplar image not found: {image}")
        try:
            with Image.open(image) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
                    w, h = h, w
        except OSError:
            raise BadInput(f"{where}: exemplar image {image} is not a readable image") from None
        return h, w
    return tuple(load_reduced(image).original_size)


@dataclass(frozen=True)
class VocabClass:
    """One class: its ``name`` (what detections are labelled), ``prompts`` (synonyms; none given:
    the name), ``exemplars``, ``negatives`` (look-alikes to suppress) and its own ``threshold``."""

    name: str
    prompts: tuple[str, ...] = ()
    exemplars: tuple[Exemplar, ...] = ()
    negatives: tuple[str, ...] = ()
    threshold: float | None = None

    @property
    def text_prompts(self) -> tuple[str, ...]:
        """The prompts embedded as text: the given ones; the name when the class has no exemplar either."""
        return self.prompts or (() if self.exemplars else (self.name,))


@dataclass(frozen=True)
class Vocabulary:
    """Classes (with prompts, exemplars, thresholds) and the negatives scored beside them.

    A box whose best match is a negative is dropped; every negative applies to every box (the
    class that lists it only says why it is there). ``compile(backend)`` embeds it
    (``regionclip.exemplars.compile_vocabulary``).
    """

    classes: tuple[VocabClass, ...]
    # The names scored beside the classes and never reported (``regionclip.distractors``): None
    # leaves it to the call / the model; "none", "labels", "common", a file path or a tuple of names.
    distractors: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.classes:
            raise BadInput("a vocabulary needs at least one class")
        from .distractors import check_spec

        check_spec(self.distractors)
        names = [c.name for c in self.classes]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise BadInput(f"class {dup!r} is listed twice in the vocabulary")
        for c in self.classes:
            if not str(c.name).strip():
                raise BadInput("a vocabulary class has an empty name")
            if c.threshold is not None and not 0 <= c.threshold <= 1:
                raise BadInput(f"class {c.name!r}: threshold must be in [0, 1], but got {c.threshold}")
            if any(not str(p).strip() for p in c.prompts):
                raise BadInput(f"class {c.name!r}: a prompt is empty")
            for neg in c.negatives:
                if neg in names:
                    raise BadInput(f"class {c.name!r}: negative {neg!r} is also a class; a box cannot be both "
                                   "(drop it from one of the two)")
            for i, ex in enumerate(c.exemplars):
                ex.check(f"class {c.name!r} exemplar {i + 1}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def negatives(self) -> list[str]:
        return list(dict.fromkeys(n for c in self.classes for n in c.negatives))

    @property
    def thresholds(self) -> list[float | None]:
        return [c.threshold for c in self.classes]

    @property
    def is_plain(self) -> bool:
        """Names only: the same embeddings and scoring as a plain label list."""
        return self.distractors is None and all(
            c.prompts in ((), (c.name,)) and not c.exemplars and not c.negatives and c.threshold is None
            for c in self.classes)

    def with_distractors(self, spec) -> Vocabulary:
        """This vocabulary with its distractors set to ``spec`` (``regionclip.distractors``: default,
        none, labels, common, a file, relative to the working folder, or a list of names)."""
        return dataclasses.replace(self, distractors=_distractor_spec(spec, None, "distractors"))

    # -------------------------------------------------------------------------------- build
    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> Vocabulary:
        """Plain names: each its own prompt."""
        from .labels import check_labels

        return cls(tuple(VocabClass(n) for n in dict.fromkeys(check_labels(labels))))

    @classmethod
    def from_dict(cls, data: Mapping, root: str | os.PathLike | None = None, where: str = "vocabulary") -> Vocabulary:
        """``{name: {prompts, exemplars, negatives, threshold} or None}``; exemplar paths relative to ``root``.
        A ``distractors`` key whose value is not a mapping (none, common, a file relative to ``root``,
        a list of names) sets the vocabulary's distractors; a class of that name needs a mapping."""
        if isinstance(data, Mapping) and "distractors" in data and not isinstance(data["distractors"], Mapping):
            data = dict(data)
            spec = _distractor_spec(data.pop("distractors"), root, where)
            return dataclasses.replace(cls.from_dict(data, root, where), distractors=spec)
        if not isinstance(data, Mapping) or not data:
            raise BadInput(f"{where}: expected a mapping of class names to their settings, e.g. "
                           "dog: {prompts: [dog, puppy], threshold: 0.3}")
        classes = []
        for name, spec in data.items():
            name = "" if name is None else str(name)
            at = f"{where}: class {name!r}"
            spec = {} if spec is None else spec
            if not isinstance(spec, Mapping):
                raise BadInput(f"{at}: expected a mapping such as {{prompts: [...]}} or {{}}, but got {spec!r}")
            for key in spec:
                if key not in _CLASS_KEYS:
                    hint = difflib.get_close_matches(str(key), _CLASS_KEYS, n=1, cutoff=0.5)
                    raise BadInput(f"{at}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                                  f" (known: {', '.join(_CLASS_KEYS)})"))
            prompts, negatives = (_strings(spec.get(k), f"{at}: {k}") for k in ("prompts", "negatives"))
            exemplars = tuple(e if isinstance(e, Exemplar) else Exemplar.parse(e, root, f"{at}: exemplar")
                              for e in _items(spec.get("exemplars"), f"{at}: exemplars"))
            threshold = spec.get("threshold")
            if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
                raise BadInput(f"{at}: threshold must be a number in [0, 1], but got {threshold!r}")
            if not name.strip():
                raise BadInput(f"{at}: a class needs a name (the label its detections carry)"
                               + ("" if prompts or exemplars else ", and prompts or exemplars or the name as prompt"))
            classes.append(VocabClass(name.strip(), prompts, exemplars, negatives,
                                      None if threshold is None else float(threshold)))
        return cls(tuple(classes))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Vocabulary:
        """A vocabulary file (docs/vocabulary.md); exemplar images relative to its folder."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"vocabulary file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
        if isinstance(data, Mapping) and "classes" in data and isinstance(data["classes"], Mapping):
            # a calibrated file: {target: ..., classes: {...}}, its distractors beside the classes
            data = {**data["classes"], **({"distractors": data["distractors"]} if "distractors" in data else {})}
        return cls.from_dict(data, path.parent, str(path))

    @classmethod
    def resolve(cls, labels: Sequence[str] | None = None, labels_file: str | os.PathLike | None = None,
                vocab: Vocabulary | str | os.PathLike | Mapping | None = None,
                exemplars: Iterable | Mapping = ()) -> Vocabulary | None:
        """The one vocabulary of a command: ``vocab`` (a ``Vocabulary``, YAML path or dict), else
        ``labels`` / ``labels_file`` names, with ``exemplars`` added (``"NAME=IMAGE:x1,y1,x2,y2"``
        strings, or ``{name: [(image, box_xyxy) or embedding, ...]}``): to a class of that name,
        or as an exemplar-only class. None when nothing is given (the model's own labels apply)."""
        given = [x for x in (labels, labels_file, vocab) if x is not None]
        if len(given) > 1:
            raise BadInput("give one of labels, a labels file and a vocabulary file")
        if isinstance(vocab, Vocabulary):
            out = vocab
        elif isinstance(vocab, Mapping):
            out = cls.from_dict(vocab)
        elif vocab is not None:
            out = cls.from_yaml(vocab)
        elif labels_file is not None:
            from .labels import read_label_lines

            out = cls.from_labels(read_label_lines(labels_file))
        elif labels is not None:
            out = cls.from_labels(labels)
        else:
            out = None
        extra = _exemplar_items(exemplars)
        if not extra:
            return out
        classes = list(out.classes) if out is not None else []
        for name, ex in extra:
            i = next((k for k, c in enumerate(classes) if c.name == name), None)
            if i is None:
                classes.append(VocabClass(name, exemplars=(ex,)))
            else:  # a named class keeps its name as a prompt: --labels cat --exemplar cat=... is text + exemplar
                c = classes[i]
                classes[i] = dataclasses.replace(c, prompts=c.text_prompts, exemplars=c.exemplars + (ex,))
        return cls(tuple(classes), out.distractors if out is not None else None)

    def to_manifest(self) -> dict:
        """A JSON-able description (what a results manifest records to reproduce the run)."""
        out = {"classes": self._entries(lambda e: e.to_manifest(), lambda t: t), "exemplar_weight": EXEMPLAR_WEIGHT}
        if self.distractors is not None:
            out["distractors"] = _spec_out(self.distractors)
        return out

    def to_yaml_dict(self) -> dict:
        """``{name: settings}`` as a vocabulary file writes it (exemplars as IMAGE:x1,y1,x2,y2;
        precomputed exemplar embeddings have no file form and are left out), and ``distractors`` when set."""
        return ({"distractors": _spec_out(self.distractors)} if self.distractors is not None else {}) | self._entries(
            lambda e: None if e.embedding is not None else
            f"{Path(e.image).resolve()}:" + ",".join(f"{v:g}" for v in e.box_xyxy),
            lambda t: round(float(t), 6))

    def _entries(self, exemplar, threshold) -> dict:
        """``{name: {prompts, exemplars, negatives, threshold}}`` with only what a class sets;
        ``exemplar(e)`` / ``threshold(t)`` write those two (an exemplar written as None is left out)."""
        out = {}
        for c in self.classes:
            entry: dict = {}
            if c.prompts:
                entry["prompts"] = list(c.prompts)
            exemplars = [x for x in map(exemplar, c.exemplars) if x is not None]
            if exemplars:
                entry["exemplars"] = exemplars
            if c.negatives:
                entry["negatives"] = list(c.negatives)
            if c.threshold is not None:
                entry["threshold"] = threshold(c.threshold)
            out[c.name] = entry
        return out


def _distractor_spec(value, root, where: str):
    """A vocabulary's ``distractors`` value: a source name, a file (relative to ``root``) or names."""
    from .distractors import BUILTIN, DEFAULT, NONE

    if isinstance(value, str):
        if value.strip().lower() in (DEFAULT, NONE, *BUILTIN):
            return value.strip().lower()
        path = Path(value).expanduser()
        return str((path if root is None or path.is_absolute() else Path(root) / path).resolve())
    return _strings(value, f"{where}: distractors")


def _spec_out(spec):
    return list(spec) if isinstance(spec, tuple) else spec


def _items(value, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, Exemplar)):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise BadInput(f"{where}: expected a list, but got {value!r}")
    return list(value)


def _strings(value, where: str) -> tuple[str, ...]:
    items = _items(value, where)
    if not all(isinstance(s, str) and s.strip() for s in items):
        raise BadInput(f"{where}: expected non-empty strings, but got {items!r}")
    return tuple(s.strip() for s in items)


def _exemplar_items(exemplars) -> list[tuple[str, Exemplar]]:
    """``"NAME=IMAGE:x1,y1,x2,y2"`` strings or ``{name: [...]}`` -> ``[(name, Exemplar)]``."""
    out = []
    if isinstance(exemplars, Mapping):
        for name, items in exemplars.items():
            items = [items] if isinstance(items, (torch.Tensor, np.ndarray)) else _items(items, f"exemplars of {name!r}")
            for item in items:
                if isinstance(item, Exemplar):
                    ex = item
                elif isinstance(item, (torch.Tensor, np.ndarray)):
                    ex = Exemplar(embedding=torch.as_tensor(np.asarray(item, dtype=np.float32)).reshape(-1))
                elif isinstance(item, str):
                    ex = Exemplar.parse(item, where=f"exemplar of {name!r}")
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    ex = Exemplar(item[0], tuple(float(v) for v in item[1]))
                else:
                    raise BadInput(f"exemplar of {name!r}: give (image, (x1, y1, x2, y2)), 'IMAGE:x1,y1,x2,y2' "
                                   f"or an embedding, but got {type(item).__name__}")
                out.append((str(name).strip(), ex))
        return out
    for spec in exemplars:
        name, sep, rest = str(spec).partition("=")
        if not sep or not name.strip():
            raise BadInput(f"--exemplar {spec!r}: write NAME=IMAGE:x1,y1,x2,y2")
        out.append((name.strip(), Exemplar.parse(rest, where=f"--exemplar {spec!r}:")))
    return out
