"""ONNX export + the onnxruntime detector against torch: the demo model, new vocabularies, image
sizes, the pool encoders (tiny models), torch-free inference, and broken exports as one line."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_cli import run
from open_clip.tokenizer import default_bpe
from torchvision.ops import batched_nms, box_iou, nms

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from regionclip import RegionCLIP  # noqa: E402
from regionclip.box_head import BoxRefiner  # noqa: E402
from regionclip.data.shapes import CATEGORIES, render_shapes_image  # noqa: E402
from regionclip.errors import BadConfig, RegionClipError, WeightsUnavailable  # noqa: E402
from regionclip.onnx import OnnxDetector, OnnxUnavailable, export_onnx, ops  # noqa: E402
from regionclip.predictor import Predictor  # noqa: E402
from regionclip.onnx.tokenizer import ClipTokenizer  # noqa: E402
from regionclip_cli.main import main  # noqa: E402

# (h, w): square, landscape, portrait, larger than the demo's input_max_side (640: reduced on
# decoding), a strip; all through the one export.
SIZES = [(256, 256), (192, 320), (320, 200), (520, 700), (64, 300)]


@pytest.fixture(scope="module")
def demo():
    return RegionCLIP.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo's export, once for the module, by ``regionclip export`` (2 s a time); the API's
    ``export_onnx`` is the tiny models' below and docs/onnx.md's."""
    folder = tmp_path_factory.mktemp("demo_onnx")
    try:
        main(["export", "--model", "demo", "--format", "onnx", "--out", str(folder)])
    except SystemExit as exc:
        assert not exc.code, f"regionclip export exited {exc.code}"
    return folder


@pytest.fixture(scope="module")
def onnx_demo(exported):
    net = RegionCLIP.from_onnx(exported)  # the one Predictor, over the ONNX backend
    assert isinstance(net, Predictor) and isinstance(net.backend, OnnxDetector)
    return net


def shapes(seed: int, size) -> np.ndarray:
    return render_shapes_image(np.random.default_rng(seed), size, empty_prob=0.0)[0]


def assert_same(want, got, where=""):
    """Same detections: each torch box has its ONNX box (IoU >= 0.99, same label, score within 1e-3)."""
    assert len(want) == len(got), f"{where}: torch {len(want)} detections, onnx {len(got)}\n{want.names}\n{got.names}"
    if not len(want):
        return
    iou = box_iou(want.boxes_xyxy, got.boxes_xyxy)
    same = want.label_ids[:, None] == got.label_ids[None, :]
    same &= (want.scores[:, None] - got.scores[None, :]).abs() <= 1e-3
    iou = torch.where(same, iou, torch.zeros_like(iou))
    best = iou.max(dim=1)
    assert bool((best.values >= 0.99).all()), (
        f"{where}: unmatched torch detections {torch.nonzero(best.values < 0.99).flatten().tolist()}: "
        f"torch {list(zip(want.names, want.scores.tolist()))} onnx {list(zip(got.names, got.scores.tolist()))}")
    assert len(set(best.indices.tolist())) == len(want), f"{where}: two torch detections matched one onnx box"


@pytest.mark.parametrize("scoring", [{}, {"score_threshold": 0.05, "top_k": 3, "agnostic_nms": False}],
                         ids=["preset", "low-threshold-top3"])
def test_demo_matches_torch_on_shapes_images_of_several_sizes(demo, onnx_demo, scoring):
    found = 0
    for seed, size in enumerate(SIZES):
        img = shapes(seed, size)
        want, got = demo.detect(img, CATEGORIES, **scoring), onnx_demo.detect(img, CATEGORIES, **scoring)
        assert_same(want, got, f"image {size}")
        found += len(want)
    assert found >= 10  # the comparison saw real detections, not empty lists


def test_vocabulary_never_exported_matches_torch_and_is_cached(demo, onnx_demo):
    img = shapes(7, (288, 384))
    for labels in (["red circle", "blue square"], ["yellow triangle", "a green circle", "purple hexagon", "dog"]):
        assert_same(demo.detect(img, labels, score_threshold=0.05), onnx_demo.detect(img, labels, score_threshold=0.05))
        np.testing.assert_allclose(onnx_demo.encode_text(labels), demo.encode_text(labels).numpy(), atol=1e-5)
    before = onnx_demo.labels_encoded
    onnx_demo.encode_text(["dog", "red circle"])
    assert onnx_demo.labels_encoded == before  # both were cached


def test_text_embeddings_array_or_npy_file(demo, onnx_demo, tmp_path):
    labels = ["red square", "blue circle", "green triangle"]
    np.save(tmp_path / "emb.npy", demo.encode_text(labels).numpy())
    img = shapes(3, (256, 320))
    want = demo.detect(img, labels, score_threshold=0.05)
    assert_same(want, onnx_demo.detect(img, labels, text_embeddings=tmp_path / "emb.npy", score_threshold=0.05))
    with pytest.raises(RegionClipError, match="3 rows but 2 labels"):
        onnx_demo.detect(img, labels[:2], text_embeddings=tmp_path / "emb.npy")


def test_pyramid_levels_and_boxes_outside_the_image(demo, onnx_demo):
    """Crop mode cuts boxes over 4x the crop size from halved copies of the image (levels 1-3)."""
    img = shapes(11, (480, 640))
    boxes = np.array([[10, 10, 60, 40], [0, 0, 300, 200], [-50, -30, 600, 470], [100, 50, 1300, 1250],
                      [630, 470, 700, 520], [5, 5, 5.5, 5.2]], dtype=np.float32)
    want = demo.encode_regions(img, boxes).numpy()
    got = onnx_demo.embed(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / np.float32(255), boxes)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("arch", ["rn", "vit"])
def test_pool_encoders_match_torch(arch, tmp_path):
    """The real presets' region paths on tiny random models: ResNet pool, layer4 per region (rn50),
    and ViT pool, whose token count follows the image size (fast)."""
    regions = {"pool_short_side": 96, "pool_max_side": 160}
    model = tiny_model(arch, "pool", proposals={"num_proposals": 30}, regions=regions)
    export_onnx(model, tmp_path)
    net = Predictor(OnnxDetector(tmp_path))
    for seed, size in enumerate([(120, 160), (150, 100)]):
        img = shapes(seed, size)
        kw = {"score_threshold": 0.0, "agnostic_nms": False, "top_k": 1}
        assert_same(model.detect(img, ["red circle", "green square"], **kw),
                    net.detect(img, ["red circle", "green square"], **kw), f"{arch} {size}")


def test_second_stage_refinement_matches_torch(tmp_path):
    """proposals.source=refined: the proposal graph also gives the backbone's maps, the second
    stage graph the class scores and deltas of the RPN's boxes; the runtime moves the boxes as
    ProposalStage._refined_boxes does (weights scaled up so boxes move by pixels)."""
    model = tiny_model("vit", "crop", proposals={"num_proposals": 30, "source": "refined", "box_head_width": 16})
    with torch.no_grad():
        model.proposals.detector.roi_heads.box_predictor.bbox_pred.weight.mul_(30.0)
    export_onnx(model, tmp_path)
    net = Predictor(OnnxDetector(tmp_path))
    assert net.manifest["second_stage"]["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert net.manifest["graphs"]["second_stage"]["inputs"][-1] == "boxes"
    refined = model.cfg.proposals
    for seed, size in enumerate([(120, 160), (150, 100)]):
        img = shapes(seed, size)
        batch = model.batch(model.load([img]))
        with torch.no_grad():
            (want,), (obj,) = model.propose(batch)
            model.proposals.configure(dataclasses.replace(refined, source="rpn"))
            (rpn,), _ = model.propose(batch)
            model.proposals.configure(refined)
        x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
        got, got_obj = net.propose(x)
        moved = (want - rpn).abs().mean().item()
        assert moved > 1.0, f"the second stage moves boxes by {moved:.2f} px on average: too little to test it"
        np.testing.assert_allclose(got, want.numpy(), atol=1e-3)
        np.testing.assert_allclose(got_obj, obj.numpy(), atol=1e-5)
        kw = {"score_threshold": 0.0, "agnostic_nms": False, "top_k": 1}
        assert_same(model.detect(img, ["red circle", "green square"], **kw),
                    net.detect(img, ["red circle", "green square"], **kw), f"refined {size}")


@pytest.mark.parametrize("arch, mode, gain", [("vit", "crop", 5.0), ("rn", "pool", 40.0)])
def test_box_refinement_matches_torch(arch, mode, gain, tmp_path):
    """A model with a box head (hidden layer, weights scaled up so boxes move by pixels): the
    regions graph gives the deltas, the runtime decodes and clips them as RegionCLIP.refine does
    and scores the proposals' embeddings, as detect_batch does."""
    regions = {"pool_short_side": 96, "pool_max_side": 160} if mode == "pool" else {}
    model = tiny_model(arch, mode, proposals={"num_proposals": 30}, regions=regions)
    head = BoxRefiner(model.regions.embed_dim(), hidden=16)
    with torch.no_grad():
        head.bbox_pred.weight.mul_(gain)
    model.box_head = head.eval()
    model.cfg.regions.box_refinement = True
    export_onnx(model, tmp_path)
    net = Predictor(OnnxDetector(tmp_path))
    assert net.manifest["box_head"]["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert net.manifest["box_head"]["hidden"] == 16
    assert net.manifest["graphs"]["regions"]["outputs"] == ["embeddings", "deltas"]

    img = shapes(4, (120, 160))
    batch = model.batch(model.load([img]))
    with torch.no_grad():
        proposals, _ = model.propose(batch)
        want = model.refine(batch, proposals, model.embed(batch, proposals, raw=True))[0]
    x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    emb, deltas = net.embed_with_deltas(x, proposals[0].numpy())
    got = net.refine(proposals[0].numpy(), deltas, (120, 160))
    moved = (want - proposals[0]).abs().mean().item()
    assert moved > 2.0, f"the head moves boxes by {moved:.2f} px on average: too little to test refinement"
    np.testing.assert_allclose(got, want.numpy(), atol=1e-3)
    np.testing.assert_allclose(emb, model.embed(batch, proposals).detach().numpy(), atol=1e-5)
    img, kw = shapes(1, (150, 100)), {"score_threshold": 0.0, "agnostic_nms": False, "top_k": 1}
    want = model.detect(img, ["red circle", "green square"], **kw)
    assert_same(want, net.detect(img, ["red circle", "green square"], **kw), f"{arch} refined")
    assert len(want) >= 5


def test_numpy_stages_match_torch():
    """The runtime's resizing, pooling and NMS against the torch / torchvision functions they mirror."""
    rng = np.random.default_rng(0)
    for (h, w), size in [((480, 640), (320, 427)), ((100, 150), (320, 480)), ((333, 251), (333, 250)),
                         ((7, 9), (1, 1))]:
        x = rng.standard_normal((3, h, w)).astype(np.float32)
        for antialias in (False, True):
            want = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False,
                                 antialias=antialias)[0].numpy()
            np.testing.assert_allclose(ops.resize_bilinear(x, size, antialias), want, atol=2e-6)
    x = rng.standard_normal((3, 7, 9)).astype(np.float32)
    want = F.avg_pool2d(torch.from_numpy(x)[None], 2, ceil_mode=True)[0].numpy()
    np.testing.assert_array_equal(ops.avg_pool2(x), want)
    for n in (0, 1, 300, 1500):  # above 1000 boxes batched_nms runs one NMS per label
        xy = rng.random((n, 2)).astype(np.float32) * 300
        boxes = np.concatenate([xy, xy + rng.random((n, 2)).astype(np.float32) * 80 + 1], 1)
        scores, labels = rng.random(n).astype(np.float32), rng.integers(0, 4, n)
        tb, ts, tl = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
        np.testing.assert_array_equal(ops.nms(boxes, scores, 0.5), nms(tb, ts, 0.5).numpy())
        np.testing.assert_array_equal(ops.batched_nms(boxes, scores, labels, 0.7),
                                      batched_nms(tb, ts, tl, 0.7).numpy())


def test_tokenizer_matches_open_clip():
    texts = ["a photo of a dog.", "  Two   SPACES &amp; HTML ", "café déjà vu", "it's 42 o'clock!!",
             "a " + "very " * 40 + "long prompt", "日本語のテキスト", "x"]
    for context in (16, 77):
        ours = ClipTokenizer(default_bpe(), context)(texts)
        np.testing.assert_array_equal(ours, open_clip.tokenizer.SimpleTokenizer(context_length=context)(texts).numpy())


def test_predict_runs_without_torch(exported, onnx_demo):
    img = shapes(5, (256, 320))
    np.save(exported.parent / "img.npy", img)
    probe = ("import sys\n"
             "sys.modules['torch'] = None  # any import of torch now fails\n"
             "import numpy as np\n"
             "from regionclip.onnx import OnnxDetector\n"
             f"net = OnnxDetector({str(exported)!r})\n"
             f"pixels = np.load({str(exported.parent / 'img.npy')!r})\n"
             "boxes, scores, ids = net.predict(pixels, ['red circle', 'blue square', 'green triangle'])\n"
             "print('RESULT', len(boxes), float(scores.sum()))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    boxes, scores, _ = onnx_demo.predict(img, ["red circle", "blue square", "green triangle"])
    count, total = proc.stdout.split("RESULT")[1].split()
    assert int(count) == len(boxes) > 0 and abs(float(total) - float(scores.sum())) < 1e-5


def _copy(src, dst):
    """A copy of an export made of hard links (files are replaced, never written to)."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def test_missing_or_swapped_graph_is_one_line(exported, tmp_path, capsys):
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), shapes(1, (128, 128))[:, :, ::-1])
    broken = _copy(exported, tmp_path / "missing")
    (broken / "regions.onnx").unlink()
    with pytest.raises(WeightsUnavailable, match="regions.onnx is missing"):
        OnnxDetector(broken)
    code, out, err = run(["detect", str(img), "--model", str(broken), "--labels", "red circle"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 4 and len(lines) == 1 and "regions.onnx is missing from the ONNX export" in lines[0], err

    swapped = _copy(exported, tmp_path / "swapped")
    (swapped / "text.onnx").unlink()
    shutil.copyfile(exported / "scoring.onnx", swapped / "text.onnx")
    with pytest.raises(WeightsUnavailable, match="text.onnx is not the file this export wrote"):
        OnnxDetector(swapped)
    with pytest.raises(WeightsUnavailable, match="is not a text graph"):
        OnnxDetector(swapped, verify=False)  # without the digests, the graph's inputs give it away
    code, out, err = run(["detect", str(img), "--model", str(tmp_path), "--labels", "red circle"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # A folder that is neither an export nor a training run: one line naming what either would hold.
    assert code == 2 and len(lines) == 1 and "manifest.json" in lines[0] and "preset.yaml" in lines[0], err


def test_cli_export_then_detect(demo, exported, tmp_path, capsys):
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), shapes(2, (256, 256))[:, :, ::-1])
    out = exported
    written = {p.name for p in out.iterdir()}
    assert {"proposals.onnx", "regions.onnx", "text.onnx", "scoring.onnx", "manifest.json"} <= written
    code, stdout, err = run(["detect", str(img), "--model", str(out), "--labels", ",".join(CATEGORIES),
                             "--json", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    want = demo.detect(str(img), CATEGORIES).to_records(image=str(img), image_id=0)
    got = json.loads((tmp_path / "d.json").read_text())
    assert [r["label"] for r in got] == [r["label"] for r in want] and len(got) > 0
    assert np.allclose([r["bbox"] for r in got], [r["bbox"] for r in want], atol=0.05)
    # Without --labels, the export's own vocabulary (the demo preset's labels), announced.
    code, stdout, err = run(["detect", str(img), "--model", str(out), "--json", str(tmp_path / "own.json")], capsys)
    assert code == 0 and "the model's own 12" in err, err
    assert json.loads((tmp_path / "own.json").read_text()) == got
    code, stdout, err = run(["detect", str(img), "--model", str(out), "--labels", "x", "--set", "scoring.top_k=2"],
                            capsys)
    assert code == 2 and "--set does not apply to the ONNX export" in err


def test_clear_errors(demo, exported, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxUnavailable, match=r"onnxruntime is not installed.*pip install -e \"\.\[onnx\]\""):
        OnnxDetector(exported)
    code, out, err = run(["export", "--model", "demo", "--out", str(tmp_path / "x")], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "onnxruntime is not installed" in lines[0], err
    monkeypatch.undo()
    model = tiny_model("vit", "crop", proposals={"source": "final"})  # scored by the detector's classifier
    with pytest.raises(BadConfig, match="proposals.source=final"):
        export_onnx(model, tmp_path / "y")
