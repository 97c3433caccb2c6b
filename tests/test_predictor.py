"""The model / predictor split: the stages as the README shows them, streaming, atomic writes, and
the jobs the CLI calls (detect on Ctrl-C, eval on the wrong images, the demo's own labels)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest
import torch
from conftest import shapes_image, tiny_model
from test_cli import TINY, run

from regionclip import Detections
from regionclip.atomic import atomic_path, atomic_torch_save, atomic_write_text
from regionclip.errors import BadOutput
from regionclip.predictor import Predictor

README = Path(__file__).resolve().parent.parent / "README.md"
LABELS = ["red circle", "green square", "blue triangle"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("vit", "crop")


def _write(folder: Path, n: int, size=(120, 160)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:02d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(shapes_image(*size, seed=i), cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def _same(a: Detections, b: Detections) -> None:
    torch.testing.assert_close(a.boxes_xyxy, b.boxes_xyxy)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.label_ids, b.label_ids)


# ------------------------------------------------------------------------------------- the stages
def test_four_stage_snippet_runs_as_written(tmp_path, monkeypatch):
    """The docs' stage-by-stage block (README or docs/), executed verbatim: it used to stop at
    ``logits`` with "Inference tensors cannot be saved for backward" (encode_text's tensors met
    autograd). Without box refinement (which the block leaves out) its detections are detect's."""
    pages = [README, *sorted((README.parent / "docs").rglob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    snippet = next(b for b in blocks if "model.propose(batch)" in b)
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("photo.jpg", cv2.cvtColor(shapes_image(240, 320, seed=3), cv2.COLOR_RGB2BGR))
    scope = {"model": tiny_model("vit", "crop"), "images": ["photo.jpg"], "labels": LABELS}
    exec(compile(snippet, "docs", "exec"), scope)
    dets = scope["dets"]
    assert len(dets) == len(scope["images"]) and all(isinstance(d, Detections) for d in dets)
    model = scope["model"]
    if not model.refines_boxes:
        for d, want in zip(dets, model.detect(scope["images"], scope["labels"])):
            _same(d, want)


def test_stages_record_autograd_only_when_something_trains():
    m = tiny_model("vit", "crop")
    batch = m.batch(m.load([shapes_image()]))
    boxes, _ = m.propose(batch)
    assert not any(p.requires_grad for p in m.parameters())  # built for inference
    assert m.embed(batch, boxes).is_inference()
    m.clip.requires_grad_(True)  # what training does (train/loop.py _set_trainable)
    regions = m.embed(batch, boxes)
    logits = m.logits(regions, m.text.embed(LABELS), scale=m.clip.logit_scale.exp())
    assert regions.requires_grad and not regions.is_inference()
    logits.sum().backward()
    assert m.clip.logit_scale.grad is not None


# ------------------------------------------------------------------------------------- streaming
def test_stream_decodes_a_chunk_at_a_time(model):
    """Memory does not grow with the inputs: the first result comes after one chunk is decoded."""
    pulled = []

    def sources():
        for i in range(50):
            pulled.append(i)
            yield shapes_image(96, 128, seed=i)

    it = model.stream(sources(), LABELS, batch_size=2, num_workers=0)
    first = next(it)
    assert first.index == 0 and isinstance(first.detections, Detections)
    assert len(pulled) == 2
    second = next(it)
    assert second.index == 1 and len(pulled) == 2


def test_stream_with_workers_keeps_order_and_results(model, tmp_path):
    paths = _write(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    paths.insert(2, tmp_path / "imgs" / "bad.png")
    alone = list(model.stream(paths, LABELS, batch_size=2, num_workers=0))
    ahead = list(model.stream(paths, LABELS, batch_size=2, num_workers=2))
    assert [p.index for p in ahead] == list(range(6)) and [p.source for p in ahead] == paths
    assert ahead[2].error and ahead[2].detections is None
    for a, b in zip(alone, ahead):
        if a.error is None:
            _same(a.detections, b.detections)
    assert not torch.is_inference_mode_enabled()  # the stream's inference mode stays inside it


def test_predictor_over_the_model_equals_the_facade(model, tmp_path):
    from regionclip.backend import TorchBackend

    paths = _write(tmp_path / "imgs", 3)
    pred = Predictor(TorchBackend(model), batch_size=3)
    for a, b in zip(pred.detect(paths, LABELS), model.detect(paths, LABELS)):
        _same(a, b)


# ----------------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_no_temporary_behind(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise error
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, tmp_path / "m.pt")  # a lambda cannot be pickled
    assert sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(BadOutput, match="cannot write"):
        atomic_write_text(target / "x", "y")  # a file where a folder should be


def test_model_save_leaves_no_temporary_on_error(model, tmp_path, monkeypatch):
    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(BadOutput, match="No space left"):
        model.save(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ jobs
def test_interrupted_detect_keeps_the_records_of_the_images_done(tmp_path, capsys, monkeypatch):
    paths = _write(tmp_path / "imgs", 5)
    out = tmp_path / "dets.json"
    original = Predictor.stream

    def interrupted(self, *args, **kwargs):
        for n, p in enumerate(original(self, *args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield p

    monkeypatch.setattr(Predictor, "stream", interrupted)
    code, _, err = run(["detect", str(tmp_path / "imgs"), "--labels", ",".join(LABELS), *TINY,
                        "--score-threshold", "0", "--batch-size", "2", "--workers", "0", "--json", str(out)], capsys)
    assert code == 130
    records = json.loads(out.read_text())
    assert {r["image"] for r in records} == {str(p) for p in paths[:3]}
    assert "interrupted: 3 of 5 image(s) done" in err


def test_eval_says_so_when_the_images_are_not_the_ground_truths(tiny_shapes, tmp_path, capsys):
    """Files of the right names from another set (other sizes): one line, non-zero exit; some: a warning."""
    gt = json.loads(Path(tiny_shapes["val_annotations"]).read_text())
    names = [img["file_name"] for img in gt["images"]]
    other = tmp_path / "other"
    other.mkdir()
    for name in names:
        cv2.imwrite(str(other / name), cv2.cvtColor(shapes_image(50, 70, seed=1), cv2.COLOR_RGB2BGR))
    argv = ["eval", "--annotations", str(tiny_shapes["val_annotations"]), *TINY]
    code, _, err = run([*argv, "--images", str(other)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "none of the" in lines[0] and "size" in lines[0], err

    some = tmp_path / "some"
    some.mkdir()
    for i, name in enumerate(names):
        src = other / name if i == 0 else Path(tiny_shapes["val_images"]) / name
        (some / name).write_bytes(src.read_bytes())
    code, _, err = run([*argv, "--images", str(some)], capsys)
    assert code == 0 and "1 image(s) do not have the size" in err, err

    # Results detected in those other images score as nothing matching, not as 0.0.
    records = [{"image": str(other / names[0]), "label": gt["categories"][0]["name"], "bbox": [1, 1, 5, 5],
                "score": 0.5}]
    (tmp_path / "res.json").write_text(json.dumps(records))
    code, _, err = run(["eval", "--annotations", str(tiny_shapes["val_annotations"]), "--results",
                        str(tmp_path / "res.json")], capsys)
    assert code != 0 and "none of the 1 images the results name" in err, err


def test_demo_without_labels_uses_its_own_names(tmp_path, capsys):
    from regionclip.data.shapes import CATEGORIES

    _write(tmp_path / "imgs", 1)
    out = tmp_path / "d.json"
    code, _, err = run(["detect", str(tmp_path / "imgs"), "--model", "demo", "--device", "cpu",
                        "--score-threshold", "0.5", "--json", str(out)], capsys)
    assert code == 0, err
    assert f"the model's own 12 ({', '.join(CATEGORIES)})" in err
    assert {r["label"] for r in json.loads(out.read_text())} <= set(CATEGORIES)
