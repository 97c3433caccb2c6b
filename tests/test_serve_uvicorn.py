"""One real uvicorn on 127.0.0.1 (a free port): the load-and-abuse test (200 requests from 8
concurrent clients with the demo model, half of them oversized, malformed or unauthenticated:
every good answer equal to the model run directly, every bad one a 4xx JSON error, memory
bounded), bodies refused before they are read, and the benchmark script kept working."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx")

LIGHT = ["proposals.num_proposals=10", "proposals.min_size=160", "proposals.max_size=160"]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
KEY = "abuse-test-key"


def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_kb(field: str = "VmRSS") -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def abuses(b, labels: str, image: bytes) -> list[tuple[str, dict, int]]:
    """(name, httpx.post keywords, expected status) of the bad requests: each a 4xx JSON error."""
    from regionclip.convert.labelstudio import config_xml

    auth = {"Authorization": f"Bearer {KEY}"}
    form = {"data": {"labels": labels}, "headers": auth}
    return [
        ("body over the limit", {"files": {"image": ("x.png", b"\0" * 600_000)}, **form}, 413),
        ("pixels over the limit", {"files": {"image": ("x.png", b.png(np.zeros((1100, 1000, 3), np.uint8)))},
                                   **form}, 413),
        ("not an image", {"files": {"image": ("x.png", b"GIF89a-not-really")}, **form}, 400),
        ("truncated image", {"files": {"image": ("x.png", image[: len(image) // 2])}, **form}, 400),
        ("broken multipart", {"content": b"--zz\r\nrubbish", "headers": {
            **auth, "Content-Type": "multipart/form-data; boundary=zz"}}, 400),
        ("JSON to /detect", {"json": {"labels": labels}, "headers": auth}, 415),
        ("too many labels", {"files": {"image": ("x.png", image)}, "data": {"labels": "a,b,c,d,e,f,g,h,i"},
                             "headers": auth}, 413),
        ("no key", {"files": {"image": ("x.png", image)}, "data": {"labels": labels}}, 401),
        ("wrong key", {"files": {"image": ("x.png", image)}, "data": {"labels": labels},
                       "headers": {"Authorization": "Basic " + base64.b64encode(b"u:guess").decode()}}, 401),
        ("/predict text/plain", {"url": "/predict", "content": f'{{"label_config": "{config_xml(["a"])}"}}',
                                 "headers": {**auth, "Content-Type": "text/plain"}}, 415),
    ]


def test_200_requests_from_8_clients_half_of_them_abusive(tmp_path):
    import httpx

    from regionclip.predictor import Predictor
    from regionclip.serve.app import Limits

    b = bench()
    predictor = Predictor.from_pretrained("demo", LIGHT, device="cpu")
    pixels = b.images(6, 48)
    expected = b.reference(predictor, pixels, b.LABELS)
    assert all(len(e["labels"]) for e in expected)  # the images have something to find
    uploads, labels = [b.png(p) for p in pixels], ",".join(b.LABELS)
    bad = abuses(b, labels, uploads[0])
    limits = Limits(max_bytes=200_000, max_pixels=1_000_000, max_labels=8, max_body=500_000)
    url, stop = b.start_server(predictor, model_name="demo", max_batch=8, limits=limits, api_key=KEY)
    local = threading.local()

    def one(i: int):
        """Even requests good (image i/2 mod 6), odd ones the bad kinds in turn."""
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=120)
        if i % 2 == 0:
            k = i // 2 % len(uploads)
            r = local.client.post("/detect", files={"image": (f"{k}.png", uploads[k], "image/png")},
                                  data={"labels": labels}, headers={"X-API-Key": KEY})
            return k, 0.0, r.status_code, r.json()
        name, kwargs, status = bad[i // 2 % len(bad)]
        r = local.client.post(kwargs.pop("url", "/detect"), **{k: v for k, v in kwargs.items()})
        return name, status, r.status_code, r.json() if r.headers.get("content-type") == "application/json" else r.text

    try:
        assert httpx.post(url + "/detect", files={"image": ("w.png", uploads[0])}, data={"labels": labels},
                          headers={"X-API-Key": KEY}).status_code == 200  # warm: the labels encoded once
        idle = rss_kb()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the storm's peak
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(200)))
        peak = rss_kb("VmHWM")
        after = httpx.post(url + "/detect", files={"image": ("x.png", uploads[0])}, data={"labels": labels},
                           headers={"X-API-Key": KEY})
    finally:
        stop()
    good, abusive = answers[::2], answers[1::2]
    assert [a[2] for a in good] == [200] * 100 and b.check(good, expected) == 0
    for name, want, status, body in abusive:
        assert status == want and isinstance(body, dict) and set(body) == {"error"}, (name, status, body)
    assert after.status_code == 200 and b.check([(0, 0, 200, after.json())], expected) == 0
    print(f"server process RSS: idle {idle / 1024:.0f} MB, peak under load {peak / 1024:.0f} MB")
    assert peak - idle < 300 * 1024, f"RSS grew from {idle / 1024:.0f} MB to {peak / 1024:.0f} MB"


def test_bodies_over_the_limit_are_refused_before_they_are_read():
    """120 MB declared (an upload to /detect, JSON to /predict): a 413 after the first 64 KB sent;
    chunked with no length: a 413 once the limit has arrived, though the body never ends."""
    from regionclip.serve.app import Limits

    b = bench()
    url, stop = b.start_server(object(), limits=Limits(max_bytes=50_000, max_body=100_000))
    port = int(url.rsplit(":", 1)[1])

    def answer(head: str, body: bytes) -> tuple[int, dict]:
        """Send ``head`` and the start of a body, send no more: the status and JSON answered."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head.replace("\n", "\r\n").encode() + body)
            got = b""
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < int(
                    re.search(rb"content-length: (\d+)", got.lower()).group(1)):
                more = s.recv(65536)  # without the limit: no answer, the server waits for the rest
                assert more, got
                got += more
        return int(got.split()[1]), json.loads(got.partition(b"\r\n\r\n")[2])

    part = b'--zz\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    try:
        for path, kind, start in (("/detect", "multipart/form-data; boundary=zz", part),
                                  ("/predict", "application/json", b'{"tasks": [')):
            status, body = answer(f"POST {path} HTTP/1.1\nHost: x\nContent-Type: {kind}\n"
                                  "Content-Length: 120000000\n\n", start + b" " * 65536)
            assert status == 413 and "limit of 100000 bytes" in body["error"], (path, status, body)
        chunk = b" " * 30_000
        status, body = answer("POST /predict HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                              "Transfer-Encoding: chunked\n\n", (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 4)
        assert status == 413 and "limit of 100000 bytes" in body["error"], (status, body)
    finally:
        stop()


def test_bench_prints_quantiles(capsys):
    out = bench().main(["--requests", "16", "--clients", "4", "--size", "32", "--images", "2",
                       *[a for s in LIGHT for a in ("--set", s)]])
    assert out["errors"] == 0 and out["wrong"] == 0 and out["p95_ms"] >= out["p50_ms"] > 0
    assert "p50" in capsys.readouterr().out
