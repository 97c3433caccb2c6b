"""regionclip.integrations.cvat: the auto-annotation function, checked with cvat-sdk's own types
and the SDK driver's validation of a function's output against a task's labels."""

from __future__ import annotations

import importlib
import logging

import pytest
from PIL import Image

from conftest import shapes_image

cvataa = pytest.importorskip("cvat_sdk.auto_annotation", reason="cvat-sdk not installed (pip install '.[cvat]')")
from cvat_sdk import models  # noqa: E402
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl  # noqa: E402

LABELS = "red circle, green square,blue triangle"


@pytest.fixture(scope="module")
def function():
    # as cvat-cli loads it: import the module, call create() with the -p parameters
    module = importlib.import_module("regionclip.integrations.cvat")
    return module.create(labels=LABELS, model="demo")


def test_spec_is_a_valid_detection_spec(function):
    assert isinstance(function.spec, cvataa.DetectionFunctionSpec)
    assert [(lab.name, lab.id, lab.type) for lab in function.spec.labels] == [
        ("red circle", 0, "rectangle"), ("green square", 1, "rectangle"), ("blue triangle", 2, "rectangle")]


def test_shapes_pass_the_drivers_validation(function):
    # a task whose labels have other ids and order: the driver maps by name and checks every shape
    task_labels = [models.Label(id=100 + i, name=n, type="any", attributes=[], sublabels=[])
                   for i, n in enumerate(["blue triangle", "green square", "red circle"])]
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels,
                               allow_unmatched_labels=False, conv_mask_to_poly=False)
    image = Image.fromarray(shapes_image(120, 160))
    shapes = function.detect(_DetectionFunctionContextImpl(frame_name="a.png"), image)
    assert shapes and all(isinstance(s, models.LabeledShapeRequest) for s in shapes)
    tags, mapped = mapper.validate_and_remap(shapes, 7)
    assert tags == [] and len(mapped) == len(shapes)
    by_label = {s.label_id: s.points for s in mapped}
    assert all(s.frame == 7 and s.type.value == "rectangle" for s in mapped)
    # the demo model finds the shapes image's red circle and green square where they were drawn
    x1, y1, x2, y2 = by_label[102]  # red circle, centre (40, 40) radius 15
    assert abs((x1 + x2) / 2 - 40) < 6 and abs((y1 + y2) / 2 - 40) < 6
    x1, y1, x2, y2 = by_label[101]  # green square (80, 60)-(112, 84)
    assert abs(x1 - 80) < 6 and abs(y2 - 84) < 6


def test_conf_threshold_is_honoured(function):
    image = Image.fromarray(shapes_image(120, 160))
    everything = function.detect(_DetectionFunctionContextImpl(frame_name="a", conf_threshold=0.0), image)
    none = function.detect(_DetectionFunctionContextImpl(frame_name="a", conf_threshold=1.0), image)
    assert len(everything) > len(none) == 0


def test_no_labels_is_refused():
    from regionclip.errors import BadInput
    from regionclip.integrations.cvat import create

    with pytest.raises(BadInput, match="labels=str"):
        create(labels=" , ")
