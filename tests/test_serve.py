"""regionclip serve: POST /detect, Label Studio's ML-backend endpoints, limits and malformed
uploads (FastAPI's TestClient), and the batch queue on its own."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import shapes_image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from regionclip.convert.labelstudio import config_xml  # noqa: E402
from regionclip.serve.app import Limits, create_app  # noqa: E402
from regionclip.serve.batcher import Batcher, Busy  # noqa: E402

LABELS = "red circle,green square"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo():
    from regionclip.predictor import Predictor

    return Predictor.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def client(demo):
    app = create_app(demo, model_name="demo", limits=Limits(max_bytes=200_000, max_pixels=1_000_000, max_labels=5))
    with TestClient(app) as c:
        yield c


def detect(client, data: bytes, labels: str | None = LABELS, **form):
    return client.post("/detect", files={"image": ("x.png", data, "image/png")},
                       data={**({"labels": labels} if labels is not None else {}), **form})


def test_detect_finds_the_shapes(client):
    r = detect(client, png(shapes_image(120, 160)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (160, 120)
    by_label = {d["label"]: d["box_xyxy"] for d in body["detections"]}
    x1, y1, x2, y2 = by_label["red circle"]  # drawn at (40, 40), radius 15
    assert abs((x1 + x2) / 2 - 40) < 6 and abs((y1 + y2) / 2 - 40) < 6
    x1, y1, x2, y2 = by_label["green square"]  # drawn from (80, 60) to (112, 84)
    assert abs(x1 - 80) < 6 and abs(y2 - 84) < 6
    assert all(0 <= d["score"] <= 1 for d in body["detections"])


def test_score_threshold_and_text_cache(client):
    batcher = client.app.state.batcher
    detect(client, png(shapes_image(120, 160)), labels="blue circle,red circle")
    encoded = batcher.encoded
    none = detect(client, png(shapes_image(120, 160)), labels="blue circle,red circle", score_threshold="1.0")
    assert none.status_code == 200 and none.json()["detections"] == []
    assert batcher.encoded == encoded  # the same labels again: no new text encoding


def truncated() -> bytes:
    data = png(shapes_image(120, 160))
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, labels, status, words", [
    (b"not an image at all", LABELS, 400, "not a readable image"),
    ("truncated", LABELS, 400, "not a readable image"),
    (b"", LABELS, 400, "empty"),
    ("huge-bytes", LABELS, 413, "limit of 200000 bytes"),
    ("huge-pixels", LABELS, 413, "pixels"),
    ("ok", None, 400, "no labels"),
    ("ok", " , ", 400, "no labels"),
    ("ok", "a,b,c,d,e,f", 413, "6 labels"),
    ("ok", LABELS + ",x" * 0, 200, ""),
])
def test_bad_requests_get_a_json_4xx_and_the_server_goes_on(client, data, labels, status, words):
    data = {"truncated": truncated(), "huge-bytes": np.random.default_rng(0).bytes(300_000),
            "huge-pixels": png(np.zeros((2000, 1000, 3), np.uint8)),
            "ok": png(shapes_image(64, 64))}.get(data, data)
    r = detect(client, data, labels)
    assert r.status_code == status, r.text
    if status != 200:
        assert words in r.json()["error"]
    ok = detect(client, png(shapes_image(64, 64)))  # still serving
    assert ok.status_code == 200


def test_no_image_paths_off_and_bad_fields(client, tmp_path):
    r = client.post("/detect", data={"labels": LABELS})
    assert r.status_code == 400 and "form field 'image'" in r.json()["error"]
    (tmp_path / "a.png").write_bytes(png(shapes_image(64, 64)))
    r = client.post("/detect", data={"labels": LABELS, "path": str(tmp_path / "a.png")})
    assert r.status_code == 400 and "--allow-paths" in r.json()["error"]
    r = client.post("/detect", files={"image": ("x.png", png(shapes_image(64, 64)))},
                    data={"labels": LABELS, "score_threshold": "lots"})
    assert r.status_code == 422 and "score_threshold" in r.json()["error"]


def test_paths_when_allowed(demo, tmp_path):
    (tmp_path / "a.png").write_bytes(png(shapes_image(120, 160)))
    with TestClient(create_app(demo, allow_paths=True)) as c:
        r = c.post("/detect", data={"labels": LABELS, "path": str(tmp_path / "a.png")})
        assert r.status_code == 200 and {d["label"] for d in r.json()["detections"]} == set(LABELS.split(","))
        r = c.post("/detect", data={"labels": LABELS, "path": str(tmp_path / "nope.png")})
        assert r.status_code == 400 and "no such file" in r.json()["error"]


def test_label_studio_endpoints(client, demo):
    assert client.get("/health").json()["status"] == "UP"
    config = config_xml(["red circle", "green square"], from_name="box", to_name="img")
    r = client.post("/setup", json={"project": "3.1700000000", "schema": config})
    assert r.status_code == 200 and r.json() == {"model_version": "demo"}
    uri = "data:image/png;base64," + base64.b64encode(png(shapes_image(120, 160))).decode()
    tasks = [{"id": 1, "data": {"image": uri}}, {"id": 2, "data": {"image": "/data/upload/1/x.png"}}]
    # the project's config from /setup; the second image lives on a Label Studio the server was not told of
    r = client.post("/predict", json={"tasks": tasks, "project": "3.1700000000"})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert second["result"] == []
    expected = detect(client, png(shapes_image(120, 160))).json()["detections"]
    assert len(first["result"]) == len(expected) > 0
    for res, d in zip(first["result"], expected):
        assert (res["type"], res["from_name"], res["to_name"]) == ("rectanglelabels", "box", "img")
        assert (res["original_width"], res["original_height"]) == (160, 120)
        v = res["value"]
        box = [v["x"] * 1.6, v["y"] * 1.2, (v["x"] + v["width"]) * 1.6, (v["y"] + v["height"]) * 1.2]
        np.testing.assert_allclose(box, d["box_xyxy"], atol=0.02)
        assert v["rectanglelabels"] == [d["label"]] and res["score"] == pytest.approx(d["score"], abs=1e-4)
    # the prediction's score: 1 - the image's review priority, so Label Studio lists the least sure first
    from regionclip.doubt import detections_priority

    want = 1.0 - detections_priority(demo.detect(shapes_image(120, 160), ["red circle", "green square"]))
    assert first["score"] == pytest.approx(want, abs=1e-5) and second["score"] == 0.0


def test_label_studio_bad_bodies(client):
    assert client.post("/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    r = client.post("/predict", json={"tasks": [], "label_config": "<View><Image name='i' value='$image'/></View>"})
    assert r.status_code == 400 and "RectangleLabels" in r.json()["error"]
    r = client.post("/predict", json={"tasks": [{"data": {}}], "project": "999"})
    assert r.status_code == 400 and "/setup" in r.json()["error"]


class _Gate:
    """A predictor stand-in whose first batch waits for ``open``: jobs pile up behind it."""

    def __init__(self):
        self.entered, self.gate, self.sizes, self.labels = threading.Event(), threading.Event(), [], []

    def vocabulary(self, labels):
        return labels, None

    def stream(self, pixels, labels, **kw):
        self.sizes.append(len(pixels))
        self.labels.append(labels)
        self.entered.set()
        self.gate.wait(10)
        from regionclip.predictor import Prediction

        return [Prediction(i, i, error="stand-in") for i in range(len(pixels))]


def test_waiting_requests_share_a_batch_and_the_queue_is_bounded():
    fake = _Gate()
    batcher = Batcher(fake, max_batch=8, max_queue=7, max_wait=0.0)
    try:
        first = batcher.submit(np.zeros((4, 4, 3), np.uint8), ["a"])
        assert fake.entered.wait(10)
        rest = [batcher.submit(np.zeros((4, 4, 3), np.uint8), ["a"]) for _ in range(6)]
        other = batcher.submit(np.zeros((4, 4, 3), np.uint8), ["b"])  # another vocabulary: its own batch
        with pytest.raises(Busy):
            batcher.submit(np.zeros((4, 4, 3), np.uint8), ["a"])
        fake.gate.set()
        for f in [first, *rest, other]:
            with pytest.raises(Exception, match="stand-in"):
                f.result(10)
        assert fake.sizes == [1, 6, 1]
    finally:
        fake.gate.set()
        batcher.close()


def test_the_queue_is_bounded_in_bytes_of_decoded_images():
    """Images waiting or running count; one image alone always fits; bytes come back when done."""
    fake = _Gate()
    batcher = Batcher(fake, max_batch=8, max_queue=64, max_bytes=100, max_wait=0.0)
    image = np.zeros((4, 4, 3), np.uint8)  # 48 bytes
    try:
        first = batcher.submit(image, ["a"])
        assert fake.entered.wait(10)
        second = batcher.submit(image, ["a"])  # 96 bytes held
        with pytest.raises(Busy, match="MB already"):
            batcher.submit(image, ["a"])
        with pytest.raises(Busy):
            batcher.reserve(5)
        fake.gate.set()
        for f in (first, second):
            with pytest.raises(Exception, match="stand-in"):
                f.result(10)
        with pytest.raises(Exception, match="stand-in"):
            batcher.submit(np.zeros((10, 10, 3), np.uint8), ["a"]).result(10)  # 300 bytes, alone: fits
        assert batcher.bytes_held == 0
    finally:
        fake.gate.set()
        batcher.close()


def test_serve_cli_checks_its_flags():
    from regionclip_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-batch", "0"])
    assert exc.value.code == 2


def test_a_request_that_waits_too_long_gets_a_json_504_and_is_not_computed_after():
    fake = _Gate()
    try:
        with TestClient(create_app(fake, limits=Limits(timeout=0.2))) as c:
            batcher = c.app.state.batcher
            running = batcher.submit(np.zeros((4, 4, 3), np.uint8), ["first"])
            assert fake.entered.wait(10)
            r = detect(c, png(shapes_image(64, 64)))  # waits behind the first: gives up
            assert r.status_code == 504 and "overloaded" in r.json()["error"]
            later = batcher.submit(np.zeros((4, 4, 3), np.uint8), ["last"])
            fake.gate.set()
            for f in (running, later):
                with pytest.raises(Exception, match="stand-in"):
                    f.result(10)
            assert fake.labels == [["first"], ["last"]]  # the one that timed out never ran
            assert batcher.bytes_held == 0
    finally:
        fake.gate.set()


def test_detect_takes_a_vocabulary_with_synonyms_negatives_and_thresholds(client, demo):
    """A vocab form field (the --vocab file's structure as JSON/YAML text) gives the detections
    the predictor gives for that vocabulary, compiled once across requests; exemplars (server
    paths) need --allow-paths."""
    import json

    from regionclip.vocabulary import Vocabulary

    spec = {"red circle": {"prompts": ["red circle", "red disc"], "threshold": 0.2},
            "green square": {"negatives": ["blue square"]}}
    pixels = shapes_image(120, 160)
    r = detect(client, png(pixels), labels=None, vocab=json.dumps(spec))
    assert r.status_code == 200, r.text
    want = demo.detect([pixels], vocab=Vocabulary.from_dict(spec))[0]
    got = r.json()["detections"]
    assert [d["label"] for d in got] == want.names
    np.testing.assert_allclose([d["box_xyxy"] for d in got], want.boxes_xyxy.numpy().reshape(-1, 4), atol=0.01)
    batcher = client.app.state.batcher
    encoded = batcher.encoded
    assert detect(client, png(pixels), labels=None, vocab=json.dumps(spec)).status_code == 200
    assert batcher.encoded == encoded  # compiled once
    for vocab, status, words in (("red circle: {exemplars: ['/etc/x.jpg:0,0,5,5']}", 400, "--allow-paths"),
                                 ("- not a mapping", 400, "mapping of class names"),
                                 ("dog: {colour: red}", 400, "colour"),
                                 # one class, but 3 prompts + 3 negatives to embed: over max_labels=5
                                 ("dog: {prompts: [a, b, c], negatives: [d, e, f]}", 413, "6 prompts, negatives")):
        r = detect(client, png(pixels), labels=None, vocab=vocab)
        assert r.status_code == status and words in r.json()["error"], r.text
    both = detect(client, png(pixels), vocab=json.dumps(spec))
    assert both.status_code == 400 and "not both" in both.json()["error"]


def test_the_text_encoders_cache_keeps_the_most_recent_labels_only(demo):
    """Every label a client sends is encoded; the encoder keeps ``Limits.text_cache`` of them.
    (Without distractors, whose embeddings are cached apart: ``prompts_encoded`` counts them too.)"""
    text = demo.model.text
    none = {"distractors": "none"}
    started = time.time_ns()
    try:
        with TestClient(create_app(demo, limits=Limits(text_cache=4))) as c:
            for labels in ("red circle,green square,blue", "square,circle,triangle"):
                assert detect(c, png(shapes_image(64, 64)), labels, **none).status_code == 200
            assert list(text._memory) == ["blue", "square", "circle", "triangle"]
            encoded = text.prompts_encoded
            assert detect(c, png(shapes_image(64, 64)), "blue", **none).status_code == 200  # kept: not encoded again
            assert text.prompts_encoded == encoded
            assert detect(c, png(shapes_image(64, 64)), "red circle", **none).status_code == 200  # dropped: again
            assert text.prompts_encoded > encoded and len(text._memory) == 4
        # the disk cache is never written from a request: each write would save the whole cache
        assert not (text.cache_file.is_file() and text.cache_file.stat().st_mtime_ns > started)
    finally:
        text.max_entries, text.read_only = None, False


def test_label_studio_malformed_fields_and_bodies_get_json_4xx(client):
    for body in ({"schema": 5}, {"schema": {"View": []}}, {"label_config": ["<View/>"]}):
        r = client.post("/setup", json=body)
        assert r.status_code == 400 and "label config must be the XML text" in r.json()["error"], r.text
    r = client.post("/predict", json={"tasks": [], "label_config": 7})
    assert r.status_code == 400 and "label config must be the XML text" in r.json()["error"], r.text
    r = client.post("/detect", content=b"--zzz\r\nnot a part header\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_a_label_studio_label_with_a_comma_stays_one_label(client):
    config = config_xml(["red, round circle", "green square"], from_name="box", to_name="img")
    uri = "data:image/png;base64," + base64.b64encode(png(shapes_image(120, 160))).decode()
    r = client.post("/predict", json={"tasks": [{"data": {"image": uri}}], "label_config": config})
    assert r.status_code == 200, r.text
    labels = {res["value"]["rectanglelabels"][0] for res in r.json()["results"][0]["result"]}
    assert labels and labels <= {"red, round circle", "green square"}, labels


def test_detect_applies_the_models_distractors_and_a_requests_own(client, demo):
    """The server names what the API names: the demo's own 12 names are scored beside a short list
    by default, and a request may turn them off or send its own (never a server file)."""
    import json

    pixels = shapes_image(120, 160)  # a red circle and a green square
    short = "red circle,blue square"

    def names(**form):
        r = detect(client, png(pixels), short, **form)
        assert r.status_code == 200, r.text
        return [d["label"] for d in r.json()["detections"]]

    labels = short.split(",")
    assert names() == demo.detect(pixels, labels).names
    assert names(distractors="none") == demo.detect(pixels, labels, distractors="none").names
    assert names(distractors="green square") == demo.detect(pixels, labels, distractors=["green square"]).names
    assert names() != names(distractors="none")  # the test means something: the square was a blue square
    r = detect(client, png(pixels), None, vocab=json.dumps({"distractors": "/etc/hostname", "red circle": {}}))
    assert r.status_code == 400 and "file on the server" in r.json()["error"]


def test_detect_by_tiles_per_request_within_the_limit(client, demo):
    """``tile`` per request: 2 windows of 100 px and the whole image, boxes back in the upload's
    pixels; past ``max_tiles`` windows a 413 before anything runs; a bad value a 400."""
    r = detect(client, png(shapes_image(100, 160)), tile="100", tile_overlap="0.25")
    assert r.status_code == 200, r.text
    by_label = {d["label"]: d["box_xyxy"] for d in r.json()["detections"]}
    x1, y1, x2, y2 = by_label["red circle"]  # drawn at (40, 33), radius 12
    assert abs((x1 + x2) / 2 - 40) < 6 and abs((y1 + y2) / 2 - 33) < 6
    assert detect(client, png(shapes_image(100, 160)), tile="32").status_code == 400
    with TestClient(create_app(demo, limits=Limits(max_tiles=1))) as c:
        r = detect(c, png(shapes_image(100, 160)), tile="100")
        assert r.status_code == 413 and "2 windows" in r.json()["error"], r.text
