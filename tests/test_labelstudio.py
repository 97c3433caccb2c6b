"""A real Label Studio (issue 24): a project made with our labelling config through
label-studio-sdk takes our tasks and gives their predictions back unchanged; then `regionclip
serve` connected as its ML backend gives predictions for a task through Label Studio's API.
Issue 33: people's corrections submitted through its API come back through its JSON export.

Label Studio is heavy (Django; its SDK pins numpy < 2.3), so it lives in its own venv,
``$LABEL_STUDIO_VENV`` (default ``~/.cache/regionclip/labelstudio-venv``, made by ``.ci/run``), and this runs as
its own step: ``python -m pytest -q -n 0 -m labelstudio`` (the default run leaves it out).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shapes_image

pytestmark = pytest.mark.labelstudio
ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("LABEL_STUDIO_VENV", Path.home() / ".cache" / "regionclip" / "labelstudio-venv"))
TOKEN = "regionclip0test0token0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Start-up failures seen from Label Studio's own dependencies: (text in its log, the package, the remedy).
KNOWN_BREAKS = [("Unknown option 'send_default_pii'", "sentry-sdk",
                 "sentry-sdk 3 breaks Label Studio 1.23.2: install with -c .ci/labelstudio-constraints.txt (sentry-sdk<3)")]


def exit_reason(log: Path | None) -> str:
    """Why Label Studio died, from its log: a known broken dependency by name, else the log's last line."""
    text = log.read_text(errors="replace") if log is not None and log.is_file() else ""
    for needle, package, remedy in KNOWN_BREAKS:
        if needle in text:
            return f"{package} broke it: {remedy}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no log"


def wait_up(url: str, proc: subprocess.Popen, seconds: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}): {exit_reason(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {seconds} s")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    exe = VENV / "bin" / "label-studio"
    if not exe.is_file():
        pytest.skip(f"no Label Studio at {exe}: python -m venv {VENV} && {VENV}/bin/pip install label-studio")
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_USERNAME": "ci@example.com",
           "LABEL_STUDIO_PASSWORD": "ci-password-1", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           # an ML backend on 127.0.0.1 is refused unless these are off (Label Studio's SSRF guard)
           "SSRF_PROTECTION_ENABLED": "false", "USE_DEFAULT_BANNED_SUBNETS": "false"}
    log = open(data / "label-studio.log", "w")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, 240, data / "label-studio.log")
        _enable_legacy_tokens(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _enable_legacy_tokens(url: str) -> None:
    """New organisations refuse the legacy token the tests authenticate with; switch it on as the
    admin would in the UI (log in, then the JWT settings)."""
    script = f"""
import requests
s = requests.Session()
s.get({url!r} + "/user/login/")
s.post({url!r} + "/user/login/", data={{"email": "ci@example.com", "password": "ci-password-1",
       "csrfmiddlewaretoken": s.cookies.get("csrftoken")}}, headers={{"Referer": {url!r} + "/user/login/"}})
r = s.post({url!r} + "/api/jwt/settings", json={{"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}},
           headers={{"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": {url!r}}})
assert r.status_code == 200, r.text
"""
    subprocess.run([str(VENV / "bin" / "python"), "-c", script], check=True, timeout=60)


def sdk(**args) -> dict:
    out = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "labelstudio_client.py"),
                          json.dumps(args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_tasks_predictions_and_the_ml_backend(label_studio, tmp_path, monkeypatch):
    from regionclip_cli.main import main

    monkeypatch.chdir(tmp_path)
    for i in range(2):
        Image.fromarray(shapes_image(120, 160, seed=i)).save(f"im{i}.png")
    for argv in (["detect", "im0.png", "im1.png", "--model", "demo", "--json", "det.json", "--workers", "0"],
                 ["convert", "det.json", "--to", "labelstudio", "--out", "ls", "--model-version", "ours"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code in (0, None)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    for t in tasks:  # inline images: Label Studio keeps the string and the backend decodes it
        t["data"]["image"] = "data:image/png;base64," + base64.b64encode(Path(t["data"]["image"]).read_bytes()).decode()
    (tmp_path / "ls" / "tasks.json").write_text(json.dumps(tasks))

    got = sdk(step="import", url=label_studio, token=TOKEN, config=str(tmp_path / "ls" / "config.xml"),
              tasks=str(tmp_path / "ls" / "tasks.json"))
    assert len(got["tasks"]) == 2
    for ours, theirs in zip(tasks, got["predictions"]):
        (pred,) = theirs
        assert pred["model_version"] == "ours" and pred["result"] == ours["predictions"][0]["result"]

    port = free_port()
    backend = subprocess.Popen([sys.executable, "-m", "regionclip_cli.main", "serve", "--model", "demo",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_up(f"http://127.0.0.1:{port}", backend, 120)
        got = sdk(step="backend", url=label_studio, token=TOKEN, backend=f"http://127.0.0.1:{port}",
                  project=got["project"], task=got["tasks"][0])
    finally:
        backend.terminate()
        backend.wait(30)
    served = [p for p in got["predictions"] if p["model_version"] == "demo"]
    assert len(served) == 1, got
    ours = tasks[0]["predictions"][0]["result"]
    theirs = served[0]["result"]
    assert [r["value"]["rectanglelabels"] for r in theirs] == [r["value"]["rectanglelabels"] for r in ours]
    for a, b in zip(theirs, ours):  # the same model on the same pixels: the same boxes, in percent
        np.testing.assert_allclose([a["value"][k] for k in "xy"] + [a["value"]["width"], a["value"]["height"]],
                                   [b["value"][k] for k in "xy"] + [b["value"]["width"], b["value"]["height"]],
                                   atol=0.2)


def test_corrections_come_back_through_the_export(label_studio, tmp_path, monkeypatch):
    """label -> convert --doubt-first -> imported; a person's correction of one task (a box moved,
    one deleted, one added; an earlier draft before it) and a skipped other task, submitted through
    the API; the project's JSON export converted to COCO instances holds exactly the correction."""
    from regionclip_cli.main import main

    monkeypatch.chdir(tmp_path)
    for i in range(2):
        Image.fromarray(shapes_image(120, 160, seed=i)).save(f"im{i}.png")
    for argv in (["label", "im0.png", "im1.png", "--model", "demo", "--out", "lab", "--workers", "0"],
                 ["convert", "lab", "--to", "labelstudio", "--out", "ls", "--doubt-first"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code in (0, None)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    got = sdk(step="import", url=label_studio, token=TOKEN, config=str(tmp_path / "ls" / "config.xml"),
              tasks=str(tmp_path / "ls" / "tasks.json"))
    ids = got["tasks"]
    predicted = got["predictions"][0][0]["result"]
    assert len(predicted) >= 2 and got["predictions"][0][0]["score"] == pytest.approx(tasks[0]["predictions"][0]["score"])
    moved = json.loads(json.dumps(predicted[0]))
    moved["value"]["x"] += -5.0 if moved["value"]["x"] >= 5 else 5.0  # inside the image either way
    added = {**json.loads(json.dumps(predicted[0])), "id": "new1"}
    added["value"] = {"x": 80.0, "y": 75.0, "width": 12.5, "height": 20.0, "rotation": 0,
                      "rectanglelabels": ["blue square"]}
    correction = [moved, added]  # predicted[1:] deleted
    sdk(step="correct", url=label_studio, token=TOKEN, project=got["project"], export=str(tmp_path / "export.json"),
        annotations=[{"task": ids[0], "result": predicted, "was_cancelled": False},  # a first draft
                     {"task": ids[0], "result": correction, "was_cancelled": False},
                     {"task": ids[1], "result": [], "was_cancelled": True}])  # skipped
    exported = {t["id"]: t for t in json.loads((tmp_path / "export.json").read_text())}
    assert len(exported[ids[0]]["annotations"]) == 2 and exported[ids[1]]["annotations"][0]["was_cancelled"]
    assert exported[ids[0]]["data"]["priority"] == tasks[0]["data"]["priority"]  # a data manager column
    with pytest.raises(SystemExit) as exc:
        main(["convert", "export.json", "--to", "coco", "--out", "gt.json"])
    assert exc.value.code in (0, None)
    gt = json.loads((tmp_path / "gt.json").read_text())
    assert [im["file_name"] for im in gt["images"]] == [tasks[0]["data"]["image"]]  # the skipped task is left out
    names = {c["id"]: c["name"] for c in gt["categories"]}
    w, h = predicted[0]["original_width"], predicted[0]["original_height"]
    want = [[r["value"]["x"] * w / 100, r["value"]["y"] * h / 100, r["value"]["width"] * w / 100,
             r["value"]["height"] * h / 100] for r in correction]
    assert [names[a["category_id"]] for a in gt["annotations"]] == [r["value"]["rectanglelabels"][0] for r in correction]
    np.testing.assert_allclose([a["bbox"] for a in gt["annotations"]], want, atol=2e-3)
