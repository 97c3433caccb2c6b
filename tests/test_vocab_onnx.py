"""ONNX keeps the vocabulary live: the exported region graph embeds exemplars (no re-export for a
new example image), and a compiled vocabulary (exemplars, negatives, class thresholds) detects
as torch does."""

import numpy as np
import pytest
import torch
from test_onnx import assert_same, shapes

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from regionclip.onnx import export_onnx  # noqa: E402
from regionclip import RegionCLIP  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    demo = RegionCLIP.from_pretrained("demo", device="cpu")
    folder = tmp_path_factory.mktemp("demo_onnx_vocab")
    export_onnx(demo, folder)
    return demo, RegionCLIP.from_onnx(folder)


def test_exemplars_through_the_exported_region_graph_match_torch(pair, tmp_path):
    import cv2

    demo, onnx = pair
    ref = tmp_path / "ref.png"  # an image the export has never seen
    cv2.imwrite(str(ref), cv2.cvtColor(shapes(7, (240, 320)), cv2.COLOR_RGB2BGR))
    vocab = {"thing": {"exemplars": [f"{ref}:40,30,120,110", f"{ref}:150,60,230,150"]},
             "red circle": {"prompts": ["red circle", "red disc"], "exemplars": [f"{ref}:10,10,60,60"],
                            "threshold": 0.5},
             "green square": {"negatives": ["blue triangle"]}}
    want, got = demo.predictor.compile(vocab), onnx.compile(vocab)
    assert isinstance(got.embeddings, np.ndarray) and got.rules == want.rules
    np.testing.assert_allclose(got.embeddings, want.embeddings.numpy(), atol=1e-5)
    found = 0
    for seed in (0, 1):
        image = shapes(seed, (256, 256))
        kw = dict(score_threshold=0.2, top_k=1)
        torch_dets = demo.detect(image, vocab=vocab, **kw)
        assert_same(torch_dets, onnx.detect(image, vocab=vocab, **kw), f"seed {seed}")
        found += len(torch_dets)
    assert found > 0
