"""Latency of `regionclip serve` under concurrent clients: p50 / p95 per request, and throughput.

Starts the server in this process (uvicorn on 127.0.0.1, a free port), sends --requests uploads
of generated shapes images from --clients threads at once, checks every answer against the
model run directly on the same image, and prints the latency quantiles. Loopback only.

    python benchmarks/bench_serve.py --model demo --requests 200 --clients 8
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shapes_image, the tests' generator

LABELS = ["red circle", "green square", "blue triangle"]


def start_server(predictor, **options):
    """The app over ``predictor`` served by uvicorn in a thread: (base URL, stop function)."""
    import uvicorn

    from regionclip.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def images(n: int, size: int) -> list[np.ndarray]:
    from conftest import shapes_image

    return [shapes_image(size, size, seed=i) for i in range(n)]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def load(url: str, uploads: list[bytes], labels: list[str], requests: int, clients: int) -> list[tuple[int, float, int, dict]]:
    """``requests`` POST /detect calls, image ``i % len(uploads)``, from ``clients`` threads at once:
    per request (image index, seconds, status, JSON body), in request order."""
    import httpx

    local = threading.local()

    def one(i: int):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=120)
        k = i % len(uploads)
        start = time.perf_counter()
        r = local.client.post("/detect", files={"image": (f"{k}.png", uploads[k], "image/png")},
                              data={"labels": ",".join(labels)})
        return k, time.perf_counter() - start, r.status_code, r.json()

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(requests)))


def check(answers, expected: list[dict]) -> int:
    """How many answers differ from the model run directly (labels in order, boxes within 0.5 px)."""
    wrong = 0
    for k, _, status, body in answers:
        want = expected[k]
        got = body.get("detections", []) if status == 200 else None
        if got is None or [d["label"] for d in got] != want["labels"] or not np.allclose(
                np.asarray([d["box_xyxy"] for d in got]).reshape(-1, 4), want["boxes"], atol=0.5):
            wrong += 1
    return wrong


def reference(predictor, pixels: list[np.ndarray], labels: list[str]) -> list[dict]:
    out = []
    for p in pixels:
        d = predictor.detect(p, labels).cpu()
        out.append({"labels": d.names, "boxes": d.boxes_xyxy.numpy().reshape(-1, 4)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="preset or YAML (default: demo)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="side of the generated square images, px")
    parser.add_argument("--images", type=int, default=8, help="distinct images cycled through")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="model config overrides, e.g. proposals.num_proposals=10 (repeatable)")
    args = parser.parse_args(argv)
    from regionclip.predictor import Predictor

    predictor = Predictor.from_pretrained(args.model, args.sets, device="cpu")
    pixels = images(args.images, args.size)
    expected = reference(predictor, pixels, LABELS)
    url, stop = start_server(predictor, model_name=args.model, max_batch=args.max_batch)
    try:
        start = time.perf_counter()
        answers = load(url, [png(p) for p in pixels], LABELS, args.requests, args.clients)
        wall = time.perf_counter() - start
    finally:
        stop()
    ms = [1000 * a[1] for a in answers]
    q = statistics.quantiles(ms, n=20)
    result = {"requests": len(answers), "clients": args.clients, "errors": sum(a[2] != 200 for a in answers),
              "wrong": check(answers, expected), "p50_ms": statistics.median(ms), "p95_ms": q[18],
              "requests_per_s": len(answers) / wall}
    print(f"{result['requests']} requests, {args.clients} clients, {args.size}x{args.size} px, model {args.model}: "
          f"p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms, {result['requests_per_s']:.1f} req/s, "
          f"{result['errors']} errors, {result['wrong']} wrong")
    return result


if __name__ == "__main__":
    main()
