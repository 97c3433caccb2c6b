"""The FastAPI app: ``POST /detect`` and Label Studio's ML-backend endpoints over one ``Batcher``.

Every error is a JSON ``{"error": message}`` with a 4xx status (503 when the queue is full),
and nothing a client sends stops the server: undecodable, truncated, empty and oversized
uploads, missing or too many labels are refused one request at a time. ``guard.Guard`` checks
the API key and the body's size before any endpoint reads it; JSON bodies are read only as
``Content-Type: application/json`` (the type a web page cannot send without asking first).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Optional

import yaml
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

from ..convert.labelstudio import prediction
from ..doubt import detections_priority
from ..errors import BadImage, BadInput, RegionClipError
from ..io import load_image
from ..labels import check_labels
from ..tiles import check_tiling
from ..vocabulary import Vocabulary

# What a request may name as its distractors besides a list of names (no server file).
DISTRACTOR_WORDS = ("default", "none", "labels", "common")
from .batcher import Batcher, Busy
from .guard import Guard
from .labelstudio import ImageFetcher, LabelConfig, TooLarge, parse_label_config, read_file


class WrongMediaType(BadInput):
    """A body of a content type the endpoint does not read: HTTP 415."""


@dataclass
class Limits:
    """What one request may ask: ``max_bytes`` per image file, ``max_pixels`` per decoded image
    (checked from the header, before decoding), ``max_labels`` texts and exemplars to embed per
    request (labels, or a vocabulary's prompts, negatives and exemplars), ``max_tiles`` windows
    per image when a request asks for tiles (``tile``), ``max_body`` bytes of request body (None:
    one image base64-encoded in JSON, and a megabyte for the rest)."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_labels: int = 256
    max_tiles: int = 256  # 2048 x 2048 at tile 160; each window costs about what a whole image does
    timeout: float = 120.0  # seconds a request waits for its batch
    max_body: Optional[int] = None
    text_cache: int = 4096  # label embeddings the text encoder keeps (least recently used dropped first)

    @property
    def body_bytes(self) -> int:
        return self.max_body if self.max_body is not None else self.max_bytes * 4 // 3 + 1_000_000


def _opened(data: bytes, limits: Limits) -> Image.Image:
    """Upload bytes -> a PIL image whose header is within the limits; nothing decoded yet."""
    if not data:
        raise BadImage("the upload is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"the upload is larger than the server's limit of {limits.max_bytes} bytes")
    with _unreadable():
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > limits.max_pixels:
        raise TooLarge(f"the image is {w}x{h}, more than the server's limit of {limits.max_pixels} pixels")
    return img


def _decoded(img: Image.Image):
    with _unreadable():
        img.load()  # a truncated file fails here, not in the worker
    return load_image(img)


@contextlib.contextmanager
def _unreadable():
    """PIL's errors for what is not an image (or a decompression bomb) -> ``BadImage``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadImage(f"the upload is not a readable image ({type(exc).__name__})") from None


def decode(data: bytes, limits: Limits):
    """Upload bytes -> HxWx3 uint8 RGB; ``BadImage`` for empty, non-image or truncated data,
    ``TooLarge`` over the limits (bytes, or pixels from the header, before decoding)."""
    return _decoded(_opened(data, limits))


def embedded(vocab: Vocabulary) -> int:
    """What a vocabulary makes the server embed: its distinct text prompts and negatives, its
    exemplars (and at least one per class). ``Limits.max_labels`` bounds this; whatever else a
    request gets embedded (distractors, once the server takes them) counts here too."""
    texts = {p for c in vocab.classes for p in c.text_prompts} | set(vocab.negatives)
    return max(len(vocab.classes), len(texts) + sum(len(c.exemplars) for c in vocab.classes))


def create_app(predictor, *, model_name: str = "regionclip", limits: Limits | None = None,
               allow_paths: bool = False, label_studio_url: str | None = None,
               label_studio_token: str | None = None, api_key: str | None = None, local_hosts_only: bool = False,
               max_batch: int = 8, max_queue: int = 64, max_queue_bytes: int = 1_000_000_000) -> FastAPI:
    """The server's app over ``predictor`` (a ``Predictor``); its ``Batcher`` is ``app.state.batcher``.
    Label Studio's URL and token come from here only, never from a request; with ``api_key``
    every request must carry it; with ``local_hosts_only`` (``serve`` sets it when there is no key)
    a request's Host header must name this machine (``guard.Guard``)."""
    limits = limits or Limits()
    batcher = Batcher(predictor, max_batch=max_batch, max_queue=max_queue, max_bytes=max_queue_bytes)
    fetcher = ImageFetcher(limits.max_bytes, url=label_studio_url, token=label_studio_token, allow_paths=allow_paths)
    configs: dict[str, LabelConfig] = {}  # Label Studio project id -> its labelling config, from /setup
    text = getattr(getattr(predictor, "model", None), "text", None)  # a torch model's TextEncoder
    if hasattr(text, "max_entries"):  # every label a client sends is encoded; none is kept for ever
        text.max_entries = limits.text_cache
        # The disk cache is read, never written: a write saves the whole cache, once per new label.
        text.read_only = True
    app = FastAPI(title="regionclip", version="1")
    app.add_middleware(Guard, max_body=limits.body_bytes, api_key=api_key, local_hosts_only=local_hosts_only)
    app.state.batcher, app.state.limits = batcher, limits
    app.router.add_event_handler("shutdown", batcher.close)

    @app.exception_handler(RegionClipError)
    def _library_error(request: Request, exc: RegionClipError):
        status = 503 if isinstance(exc, Busy) else 413 if isinstance(exc, TooLarge) else \
            415 if isinstance(exc, WrongMediaType) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, exc: HTTPException):  # FastAPI's own: an unreadable form, 404, 405
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(FutureTimeout)
    def _timeout(request: Request, exc: FutureTimeout):
        return JSONResponse({"error": f"no answer within {limits.timeout:g} s: the server is overloaded; retry later"},
                            status_code=504)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request ({where})"}, status_code=422)

    def labels_of(text: str | None) -> list[str]:
        """A form's comma-separated labels."""
        names = [s.strip() for s in (text or "").split(",") if s.strip()]
        if not names:
            raise BadInput('no labels given: send a form field labels="dog,cat"')
        return names_of(names)

    def names_of(names) -> list[str]:
        names = check_labels(list(dict.fromkeys(names)))
        if len(names) > limits.max_labels:
            raise TooLarge(f"{len(names)} labels, more than the server's limit of {limits.max_labels}")
        return names

    def queued(data: bytes, labels, tiling=None, **scoring):
        """(pixels, future) of an upload; its decoded size counts against the queue from its header on.
        ``tiling`` (``tiles.Tiling``): its windows for this image are counted against ``max_tiles`` first."""
        img = _opened(data, limits)
        if tiling is not None:
            w, h = img.size
            if (n := len(tiling.windows(h, w)) if tiling.applies(h, w) else 0) > limits.max_tiles:
                raise TooLarge(f"tile {tiling.size} cuts this {w}x{h} image into {n} windows, more than the "
                               f"server's limit of {limits.max_tiles}: send a larger tile")
            scoring = {**scoring, "tile": tiling.size, "tile_overlap": tiling.overlap}
        room = batcher.reserve(img.size[0] * img.size[1] * 3)
        try:
            pixels = _decoded(img)
            return pixels, batcher.submit(pixels, labels, room=room, **scoring)
        except BaseException:
            room.release()
            raise

    def wait(future):
        try:
            return future.result(timeout=limits.timeout)
        except FutureTimeout:
            future.cancel()  # nobody waits for it any more: not computed (unless it runs already)
            raise

    def vocab_of(text: str) -> Vocabulary:
        """A vocabulary sent as JSON or YAML text (the ``--vocab`` file's structure). Exemplar
        images are server-side paths, so they need a server started with ``--allow-paths``."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BadInput(f"vocab: not valid JSON or YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or not data:
            raise BadInput('vocab: expected a mapping of class names, e.g. {"dog": {"prompts": ["dog", "puppy"]}}')
        # Before parsing, which reads the exemplar files: without --allow-paths a request must not
        # learn even whether a server path exists.
        if not allow_paths and any(isinstance(v, dict) and "exemplars" in v for v in data.values()):
            raise BadInput("vocab: exemplars name image files on the server; start it with --allow-paths to use them")
        spec = data.get("distractors")
        if not allow_paths and isinstance(spec, str) and spec.strip().lower() not in DISTRACTOR_WORDS:
            raise BadInput("vocab: a distractors file is a file on the server; send a list of names, none, labels "
                           "or common (or start the server with --allow-paths)")
        vocab = Vocabulary.from_dict(data, where="vocab")
        if (n := embedded(vocab)) > limits.max_labels:
            raise TooLarge(f"{n} prompts, negatives and exemplars to embed, more than the server's limit of "
                           f"{limits.max_labels}")
        return vocab

    def with_distractors(names, text: str | None):
        """``names`` (labels or a vocabulary) with the request's ``distractors`` field: default, none,
        labels, common, or comma-separated names (which count against ``max_labels``)."""
        if text is None:
            return names
        spec = text.strip().lower() if text.strip().lower() in DISTRACTOR_WORDS else \
            [t.strip() for t in text.split(",") if t.strip()]
        vocab = names if isinstance(names, Vocabulary) else Vocabulary.from_labels(names)
        vocab = vocab.with_distractors(spec)
        if isinstance(spec, list) and (n := embedded(vocab) + len(spec)) > limits.max_labels:
            raise TooLarge(f"{n} labels, prompts and distractors to embed, more than the server's limit of "
                           f"{limits.max_labels}")
        return vocab

    @app.post("/detect")
    def detect(request: Request, image: Optional[UploadFile] = File(None), path: Optional[str] = Form(None),
               labels: Optional[str] = Form(None), vocab: Optional[str] = Form(None),
               score_threshold: Optional[float] = Form(None), distractors: Optional[str] = Form(None),
               tile: Optional[int] = Form(None), tile_overlap: Optional[float] = Form(None)):
        """Detections of ``labels`` (comma-separated), or of a ``vocab`` (the ``--vocab`` file's
        structure as JSON or YAML text: synonyms, negatives, per-class thresholds), in an uploaded
        ``image`` (or a server-side ``path`` when the server allows paths):
        ``{"width", "height", "detections": [{label, score, box_xyxy}]}``. ``distractors``: names
        scored beside them and never reported (default: the model's; none, labels, common, or
        comma-separated names; regionclip/distractors.py). ``tile`` (pixels) and ``tile_overlap``: detect
        small objects by overlapping windows (``regionclip.tiles``), at most ``max_tiles`` an image."""
        if _media_type(request) not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise WrongMediaType(f"/detect reads a multipart form (multipart/form-data), not "
                                 f"{_media_type(request) or 'a body without a Content-Type'}: send the image "
                                 "file as 'image' and labels=\"dog,cat\" as form fields")
        if labels is not None and vocab is not None:
            raise BadInput("send labels or vocab, not both")
        names = with_distractors(vocab_of(vocab) if vocab is not None else labels_of(labels), distractors)
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise BadInput(f"score_threshold must be in [0, 1], but got {score_threshold}")
        tiling = check_tiling(tile, tile_overlap)
        if image is not None:
            data = image.file.read(limits.max_bytes + 1)
        elif path is not None:
            data = read_file(path, limits.max_bytes) if allow_paths else _no_paths()
        else:
            raise BadInput("send an image file in the form field 'image'")
        pixels, future = queued(data, names, tiling, score_threshold=score_threshold)
        d = wait(future)
        return {"width": int(pixels.shape[1]), "height": int(pixels.shape[0]), "detections": [
            {"label": n, "score": round(float(s), 5), "box_xyxy": [round(float(v), 2) for v in b]}
            for n, s, b in zip(d.names, d.scores.tolist(), d.boxes_xyxy.tolist())]}

    @app.get("/")
    @app.get("/health")
    def health():
        return {"status": "UP", "model_class": "regionclip", "model": model_name, "batches": batcher.batches}

    @app.post("/setup")
    async def setup(request: Request):
        body = await _json(request)
        schema = body.get("schema") or body.get("label_config")
        if schema:
            config = parse_label_config(schema)
            names_of(config.labels)  # the limit on labels, now rather than on the first task
            configs[str(body.get("project", "")).split(".")[0]] = config
        # Label Studio also sends its "hostname" and "access_token": never used. The token the
        # server holds goes only to the URL it was started with, not to one a request names.
        return {"model_version": model_name}

    @app.post("/predict")
    async def predict(request: Request):
        body = await _json(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadInput("expected {'tasks': [...], 'label_config': ...} as Label Studio sends")
        project = str(body.get("project", "")).split(".")[0]
        config = parse_label_config(body["label_config"]) if body.get("label_config") else configs.get(project)
        if config is None:
            raise BadInput("no label config: send label_config, or /setup the project first")
        labels = names_of(config.labels)
        from starlette.concurrency import run_in_threadpool

        return {"results": await run_in_threadpool(_tasks, tasks, config, labels), "model_version": model_name}

    def _tasks(tasks: list, config: LabelConfig, labels: list[str]) -> list[dict]:
        """One prediction per task, in order. All are queued before any is awaited, so a page of
        tasks shares batches; a task whose image cannot be had gets an empty prediction."""
        waiting = []
        for task in tasks:
            try:
                ref = (task.get("data") or {}).get(config.data_key) if isinstance(task, dict) else None
                waiting.append(queued(fetcher.fetch(ref), labels))
            except (BadImage, BadInput):  # TooLarge included
                waiting.append((None, None))
            except Busy:
                _cancel(waiting)
                raise
        out = []
        for i, (pixels, future) in enumerate(waiting):
            if future is None:
                out.append({"result": [], "score": 0.0, "model_version": model_name})
                continue
            try:
                d = wait(future)
            except FutureTimeout:
                _cancel(waiting[i + 1:])
                raise
            h, w = pixels.shape[:2]
            # Label Studio's data manager sorts by prediction score, lowest first: the least sure
            # image (highest review priority, regionclip.doubt) first, as `convert --doubt-first`.
            priority = detections_priority(d)
            out.append(prediction(d.boxes_xyxy.numpy(), d.names, d.scores.numpy(), w, h, from_name=config.from_name,
                                  to_name=config.to_name, model_version=model_name,
                                  score=None if priority is None else 1.0 - priority))
        return out

    return app


def _cancel(waiting: list) -> None:
    """Cancel the queued ``(pixels, future)`` of a request that gives up."""
    for _, future in waiting:
        if future is not None:
            future.cancel()


def _no_paths():
    raise BadInput("this server does not read paths: upload the file as 'image', or start it with --allow-paths")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json(request: Request) -> dict:
    """The body as a JSON object, read only when sent as ``application/json``: a page in a browser
    can send text/plain to any address without asking, but application/json only after a CORS
    preflight, which this server does not answer."""
    if _media_type(request) != "application/json":
        raise WrongMediaType(f"send the body as JSON with 'Content-Type: application/json', not "
                             f"{_media_type(request) or 'without a Content-Type'}")
    try:
        body = await request.json()
    except ValueError:
        raise BadInput("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    return body
