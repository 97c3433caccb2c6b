"""One real uvicorn on 127.0.0.1 (a free port): the load test of issue 24 (200 requests from 8
concurrent clients with the demo model: no error, every answer equal to the model run directly,
requests sharing batches) and the benchmark script kept working."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx")

LIGHT = ["proposals.num_proposals=10", "proposals.min_size=160", "proposals.max_size=160"]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_200_requests_from_8_clients(tmp_path):
    from regionclip.predictor import Predictor

    b = bench()
    predictor = Predictor.from_pretrained("demo", LIGHT, device="cpu")
    pixels = b.images(6, 48)
    expected = b.reference(predictor, pixels, b.LABELS)
    assert all(len(e["labels"]) for e in expected)  # the images have something to find
    url, stop = b.start_server(predictor, model_name="demo", max_batch=8)
    try:
        answers = b.load(url, [b.png(p) for p in pixels], b.LABELS, requests=200, clients=8)
        import httpx

        batches = httpx.get(url + "/health").json()["batches"]
        bad = httpx.post(url + "/detect", files={"image": ("x.png", b"GIF89a-not-really")}, data={"labels": "a"})
        after = httpx.post(url + "/detect", files={"image": ("x.png", b.png(pixels[0]))},
                           data={"labels": ",".join(b.LABELS)})
    finally:
        stop()
    assert len(answers) == 200 and [a[2] for a in answers] == [200] * 200
    assert b.check(answers, expected) == 0
    assert batches < 200  # concurrent requests shared batches
    assert bad.status_code == 400 and "error" in bad.json() and after.status_code == 200


def test_bench_prints_quantiles(capsys):
    out = bench().main(["--requests", "16", "--clients", "4", "--size", "32", "--images", "2",
                       *[a for s in LIGHT for a in ("--set", s)]])
    assert out["errors"] == 0 and out["wrong"] == 0 and out["p95_ms"] >= out["p50_ms"] > 0
    assert "p50" in capsys.readouterr().out
