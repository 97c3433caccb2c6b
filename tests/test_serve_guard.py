"""regionclip serve, who may call it: the Label Studio token goes only where the server was told
(listeners on 127.0.0.1), the API key (required beyond loopback), JSON only as application/json,
and the body limit (FastAPI's TestClient; the real uvicorn in test_serve_uvicorn.py)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import threading

import pytest

from conftest import shapes_image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from regionclip.convert.labelstudio import config_xml  # noqa: E402
from regionclip.errors import BadInput  # noqa: E402
from regionclip.serve.app import Limits, create_app  # noqa: E402
from regionclip.serve.guard import check_exposure, host_name, is_loopback, names_this_machine  # noqa: E402
from test_serve import _Gate, png  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def demo():
    from regionclip.predictor import Predictor

    return Predictor.from_pretrained("demo", device="cpu")


@contextlib.contextmanager
def listener(image: bytes, redirect_to: str | None = None):
    """An HTTP server on 127.0.0.1 that records ``(path, Authorization)`` of every GET and answers
    with ``image``, or, for paths with "redirect" in them, a 302 to ``redirect_to``: (URL, seen)."""
    seen = []

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            if "redirect" in self.path and redirect_to:
                self.send_response(302)
                self.send_header("Location", redirect_to + "/data/upload/moved.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_predict_fetches_task_images_from_label_studio_with_the_token(demo):
    """A task's /data/upload/... URL is fetched from the Label Studio the server was told of,
    with its token; a URL elsewhere is not fetched at all."""
    with listener(png(shapes_image(120, 160))) as (url, seen):
        with TestClient(create_app(demo, label_studio_url=url, label_studio_token="T0K")) as c:
            config = config_xml(["red circle", "green square"])
            tasks = [{"data": {"image": "/data/upload/3/a.png"}}, {"data": {"image": "http://elsewhere.test/b.png"}},
                     {"data": {"image": url + "/data/upload/3/c.png"}}]
            r = c.post("/predict", json={"tasks": tasks, "label_config": config})
    assert r.status_code == 200, r.text
    first, elsewhere, third = r.json()["results"]
    assert seen == [("/data/upload/3/a.png", "Token T0K"), ("/data/upload/3/c.png", "Token T0K")]
    assert elsewhere["result"] == [] and first["result"] and first["result"] == third["result"]
    assert {res["value"]["rectanglelabels"][0] for res in first["result"]} == {"red circle", "green square"}


@pytest.mark.parametrize("configured", [False, True])
def test_the_token_never_goes_to_a_host_a_request_names(demo, configured):
    """/setup's hostname (what Label Studio sends, or anyone else) does not say where the token
    goes: only --label-studio-url does; and a redirect from there does not carry it on."""
    image = png(shapes_image(64, 64))
    with listener(image) as (evil, evil_saw), listener(image, redirect_to=evil) as (ls, ls_saw):
        app = create_app(demo, label_studio_url=ls if configured else None, label_studio_token="T0K")
        with TestClient(app) as c:
            config = config_xml(["red circle"])
            r = c.post("/setup", json={"project": "1.2", "schema": config, "hostname": evil, "access_token": "x"})
            assert r.status_code == 200, r.text
            tasks = [{"data": {"image": "/data/upload/1/a.png"}}, {"data": {"image": evil + "/data/upload/1/b.png"}},
                     {"data": {"image": "/data/upload/1/redirect.png"}}]
            r = c.post("/predict", json={"tasks": tasks, "project": "1.2"})
    assert r.status_code == 200, r.text
    assert all(auth is None for _, auth in evil_saw), evil_saw
    if configured:
        assert ls_saw == [("/data/upload/1/a.png", "Token T0K"), ("/data/upload/1/redirect.png", "Token T0K")]
        assert evil_saw == [("/data/upload/moved.png", None)]  # followed, without the token
    else:
        assert ls_saw == evil_saw == []
        assert [t["result"] for t in r.json()["results"]] == [[], [], []]


def test_the_api_key_is_required_when_set_and_taken_as_bearer_basic_or_header():
    fake = _Gate()
    fake.gate.set()
    basic = "Basic " + base64.b64encode(f"labelstudio:{KEY}".encode()).decode()
    key_as_user = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    with TestClient(create_app(fake, api_key=KEY)) as c:
        for path in ("/health", "/", "/docs", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and "API key" in r.json()["error"], (path, r.text)
        assert "Basic" in c.get("/health").headers["www-authenticate"]
        r = c.post("/predict", json={"tasks": []})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": key_as_user},
                        {"Authorization": "Basic !!!"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}):
            assert c.get("/health", headers=headers).status_code == 401, headers
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": basic}, {"X-API-Key": KEY}):
            assert c.get("/health", headers=headers).json()["status"] == "UP", headers
    with TestClient(create_app(fake)) as c:  # no key set, on loopback: open
        assert c.get("/health").status_code == 200


def test_beyond_loopback_the_server_refuses_to_start_without_a_key(monkeypatch, capsys):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "192.0.2.7", "name.invalid"))
    check_exposure("0.0.0.0", KEY)
    check_exposure("127.0.0.1", None)
    import uvicorn

    from regionclip.serve import serve

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    with pytest.raises(BadInput, match="API key"):
        serve(_Gate(), host="0.0.0.0")
    assert started == []
    from regionclip_cli.main import main

    monkeypatch.delenv("REGIONCLIP_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "no-such-model-is-loaded", "--host", "0.0.0.0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--api-key" in err and "REGIONCLIP_API_KEY" in err, err


def test_without_a_key_requests_must_name_this_machine(monkeypatch):
    """DNS rebinding: a page at attacker.example whose name now points at 127.0.0.1 sends
    ``Host: attacker.example:9090``; a keyless server answers 421, a server with a key checks the key."""
    assert [host_name(h) for h in ("[::1]:9090", "Localhost:80", "127.0.0.1", "::1")] == \
        ["::1", "localhost", "127.0.0.1", "::1"]
    assert all(names_this_machine(n) for n in ("localhost", "127.0.0.1", "127.3.2.1", "::1", "app.localhost"))
    assert not any(names_this_machine(n) for n in ("attacker.example", "localhost.attacker.example", "0.0.0.0",
                                                   "192.0.2.7", "testserver"))
    fake = _Gate()
    fake.gate.set()
    with TestClient(create_app(fake, local_hosts_only=True)) as c:
        for host in ("attacker.example:9090", "127.0.0.1.nip.io", "testserver"):
            r = c.get("/health", headers={"Host": host})
            assert r.status_code == 421 and "API key" in r.json()["error"], (host, r.text)
        for host in ("localhost:9090", "127.0.0.1:9090", "[::1]:9090"):
            assert c.get("/health", headers={"Host": host}).json()["status"] == "UP", host
    with TestClient(create_app(fake, api_key=KEY)) as c:
        r = c.get("/health", headers={"Host": "attacker.example", "X-API-Key": KEY})
        assert r.status_code == 200
    import uvicorn

    from regionclip.serve import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    serve(fake, host="127.0.0.1")
    serve(fake, host="0.0.0.0", api_key=KEY)
    with TestClient(apps[0]) as keyless, TestClient(apps[1]) as keyed:
        assert keyless.get("/health").status_code == 421  # TestClient's Host is "testserver"
        assert keyed.get("/health", headers={"X-API-Key": KEY}).status_code == 200


def test_json_bodies_only_as_application_json():
    """A web page can POST text/plain anywhere without a CORS preflight; the server reads no JSON from it."""
    fake = _Gate()
    fake.gate.set()
    config = config_xml(["red circle"])
    with TestClient(create_app(fake)) as c:
        for path in ("/setup", "/predict"):
            r = c.post(path, content=f'{{"schema": {config!r}, "tasks": []}}'.replace("'", '"'),
                       headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
            r = c.post(path, content=b"{}")  # no content type at all
            assert r.status_code == 415, r.text
        r = c.post("/setup", json={"schema": config}, headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200, r.text
        r = c.post("/detect", json={"labels": "red circle", "image": "x"})
        assert r.status_code == 415 and "multipart form" in r.json()["error"], r.text


def test_bodies_over_the_limit_get_413_whether_declared_or_chunked():
    fake = _Gate()
    fake.gate.set()
    with TestClient(create_app(fake, limits=Limits(max_body=100_000))) as c:
        big = b'{"tasks": [' + b" " * 200_000 + b"]}"
        r = c.post("/predict", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit of 100000 bytes" in r.json()["error"], r.text
        r = c.post("/predict", content=iter([big[:60_000], big[60_000:]]), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit of 100000 bytes" in r.json()["error"], r.text
        r = c.post("/detect", files={"image": ("x.png", b"\0" * 150_000)}, data={"labels": "a"})
        assert r.status_code == 413 and "limit of 100000 bytes" in r.json()["error"], r.text
        assert c.post("/predict", json={"tasks": []}).status_code == 400  # under it: read (no label config)
    assert Limits(max_bytes=3_000_000).body_bytes == 5_000_000  # one image in base64, and a megabyte
