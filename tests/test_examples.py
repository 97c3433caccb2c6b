"""The scripts in examples/ run offline on the demo model with small arguments and write what they say.

They run in this process (``runpy``), so torch is imported once for all of them, not once per script.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from regionclip.data.shapes import CATEGORIES
from regionclip.evaluate import load_ground_truth

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["label_folder", "finetune_custom", "evaluate_split", "classify_boxes", "text_cache"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while the examples run.

    Their tensors are small; on a shared 2-core machine two OpenMP threads mostly wait for each
    other behind the other processes. Measured with other test runs sharing the CPU (load
    average 7-10): the fine-tuning example took 98 s with two threads and 10 s with one, all
    five examples 136 s and 27 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def example(name: str):
    """The ``main(argv)`` of ``examples/NAME.py``."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs_as_a_script(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "Run" in out, "the help shows the module docstring"


def test_label_folder(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    from regionclip.data.shapes import render_shapes_image

    for i, ext in enumerate((".png", ".jpg")):
        Image.fromarray(render_shapes_image(rng, size=(160, 224), empty_prob=0.0)[0]).save(photos / f"p{i}{ext}")
    (photos / "broken.png").write_bytes(b"")  # skipped with a message, the rest still labelled
    out = tmp_path / "out"
    summary = example("label_folder")([str(photos), "--out", str(out)])
    assert "skipped" in capsys.readouterr().out
    assert summary["images"] == 2
    coco = load_ground_truth(out / "annotations.json")  # pycocotools reads it
    assert [im["file_name"] for im in coco.dataset["images"]] == ["p0.png", "p1.jpg"]
    assert [c["name"] for c in coco.dataset["categories"]] == CATEGORIES
    assert len(coco.dataset["annotations"]) == summary["boxes"] > 0
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 224.01 and y + h <= 160.01, ann
        assert 0 <= ann["score"] <= 1 and 1 <= ann["category_id"] <= len(CATEGORIES)
    for name in ("p0.png", "p1.jpg"):  # annotated copies keep the extension
        with Image.open(out / "annotated" / name) as img:
            assert img.size == (224, 160)


def test_finetune_custom(tmp_path):
    out = tmp_path / "run"
    summary = example("finetune_custom")(["--out", str(out), "--steps", "2", "--batch-size", "2",
                                          "--num-train", "2", "--num-val", "1", "--max-side", "128"])
    for name in ("preset.yaml", "model.pt", "config.yaml", "metrics.jsonl", "detections.jpg"):
        assert (out / name).is_file(), name
    preset = yaml.safe_load((out / "preset.yaml").read_text())
    assert Path(preset["checkpoint"]) == (out / "model.pt").resolve()
    assert len(summary["losses"]) == 2 and all(math.isfinite(v) for v in summary["losses"])
    (final,) = summary["evals"]
    recall = final.pop("R50@100")
    short = final.pop("short_lists")  # the recipe's train.eval_short_lists: fractions, AP50 in percent
    assert all(v is None or 0 <= v <= 100 for k, v in [*final.items(), *recall.items()] if k != "step"), final
    assert set(short) == {"precision", "recall", "foreign", "AP50"}
    assert all(v is None or 0 <= v <= (100 if k == "AP50" else 1) for k, v in short.items()), short
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]


def test_evaluate_split(tmp_path, capsys):
    ap50 = example("evaluate_split")(["--out", str(tmp_path), "--num-images", "3"])
    printed = capsys.readouterr().out
    for part in ("overall", "base", "novel"):
        assert f"AP50 {part:>7}" in printed
        assert ap50[part] is None or 0 <= ap50[part] <= 100
    assert ap50["overall"] is not None and ap50["base"] is not None
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["map"]["overall"]["AP50"] == pytest.approx(ap50["overall"])


def test_classify_boxes(tmp_path):
    results = example("classify_boxes")(["--top-k", "3", "--save", str(tmp_path / "boxes.png")])
    assert results and all(len(r["top"]) == 3 for r in results)
    for r in results:
        scores = [s for _, s in r["top"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert {name for name, _ in r["top"]} <= set(CATEGORIES)
    # The default image holds base shapes the demo model names right (see docs/demo-model.md).
    assert sum(r["top"][0][0] == r["truth"] for r in results) >= len(results) - 1, results
    assert (tmp_path / "boxes.png").is_file()


def test_text_cache_second_model_encodes_nothing(tmp_path):
    summary = example("text_cache")(["--out", str(tmp_path), "--labels", "red circle,blue square,dog"])
    assert summary["first"] == 3 * summary["templates"] > 0
    assert summary["second"] == 0 and summary["same"]
    assert len(summary["cache_files"]) == 1

