"""A CVAT auto-annotation function: regionclip boxes straight into a CVAT task.

    cvat-cli --server-host http://localhost:8080 --auth user:pass task auto-annotate TASK_ID \\
        --function-module regionclip.integrations.cvat -p labels=str:"dog,cat" -p model=str:demo

``cvat-cli`` calls ``create`` with the ``-p`` parameters and uses what it returns: an object with
a ``spec`` (a ``cvat_sdk.auto_annotation.DetectionFunctionSpec``: one rectangle label per name,
ids in label order) and ``detect(context, image)`` returning rectangle shapes for one PIL image.
The task's labels are matched by name, so name them as in ``labels``. Needs ``cvat-sdk``
(``pip install -e '.[cvat]' in the checkout``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import BadInput

try:
    import cvat_sdk.auto_annotation as cvataa
except ModuleNotFoundError as exc:  # the module only makes sense inside cvat-cli / the SDK
    raise ModuleNotFoundError(f"{exc}; regionclip.integrations.cvat needs the CVAT SDK: "
                              "pip install -e '.[cvat]' in the checkout", name=exc.name) from None


class RegionCLIPFunction:
    """A detection function over a predictor (anything with ``detect(image, labels, **scoring)``)."""

    def __init__(self, predictor, labels: Sequence[str], *, score_threshold: float | None = None) -> None:
        self.labels = list(dict.fromkeys(s.strip() for s in labels if s.strip()))
        if not self.labels:
            raise BadInput('no labels given: pass -p labels=str:"dog,cat"')
        self.predictor = predictor
        self.score_threshold = score_threshold
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, i, type="rectangle") for i, name in enumerate(self.labels)])
        self._ids = {name: i for i, name in enumerate(self.labels)}
        self._text = None  # the labels' embeddings, encoded on the first frame and kept for the rest

    def detect(self, context, image) -> list:
        """Rectangles (xyxy pixels of ``image``) for one frame. CVAT's ``conf_threshold``, when
        set, replaces the model's score threshold: CVAT wants nothing below it."""
        if self._text is None:
            self._text = self.predictor.vocabulary(self.labels)[1]
        threshold = context.conf_threshold if context.conf_threshold is not None else self.score_threshold
        pixels = np.asarray(image.convert("RGB"))
        d = self.predictor.detect(pixels, self.labels, text_embeddings=self._text, score_threshold=threshold).cpu()
        return [cvataa.rectangle(self._ids[name], [float(v) for v in box])
                for name, box in zip(d.names, d.boxes_xyxy.tolist())]


def create(labels: str, model: str = "demo", score_threshold: float | None = None,
           device: str = "cpu") -> RegionCLIPFunction:
    """What ``cvat-cli ... -p labels=str:"dog,cat" [-p model=str:M -p score_threshold=float:0.3
    -p device=str:cuda]`` builds: the model ``model`` (a preset or YAML) detecting ``labels``."""
    from ..predictor import Predictor

    names = labels.split(",")
    if not any(s.strip() for s in names):
        raise BadInput('no labels given: pass -p labels=str:"dog,cat"')
    return RegionCLIPFunction(Predictor.from_pretrained(model, device=device), names,
                              score_threshold=score_threshold)
