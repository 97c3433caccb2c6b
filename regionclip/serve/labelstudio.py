"""Label Studio's side of the server: the labelling config, where a task's image is, and fetching it.

Label Studio sends its project's labelling config (``/setup``'s ``schema``, ``/predict``'s
``label_config``): its ``RectangleLabels`` names the vocabulary and the result's ``from_name`` /
``to_name``; the ``Image`` tag's ``value`` (``$image``) names the task's data key. A task's
image is a URL into Label Studio (``/data/upload/...``, ``/data/local-files/?d=...``), fetched
from the Label Studio URL the server was started with (``--label-studio-url``, never one a
request names: the token goes there) with its API token, which no redirect carries on; a
``data:`` URI; or, only with ``--allow-paths``, a path.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadImage, BadInput


class TooLarge(BadInput):
    """A request over one of the server's limits (image bytes or pixels, label count): HTTP 413."""


@dataclass(frozen=True)
class LabelConfig:
    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def parse_label_config(xml: str) -> LabelConfig:
    """The first ``RectangleLabels`` of ``xml`` and the ``Image`` it points at."""
    if not isinstance(xml, str):
        raise BadInput(f"label config must be the XML text of the labelling interface, but got {type(xml).__name__}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise BadInput(f"label config is not valid XML ({exc})") from None
    rect = next(iter(root.iter("RectangleLabels")), None)
    if rect is None:
        raise BadInput("label config has no <RectangleLabels>: regionclip predicts rectangles; use the config "
                       "`regionclip convert --to labelstudio` writes")
    to_name = rect.get("toName", "")
    image = next((e for e in root.iter("Image") if e.get("name") == to_name), None)
    if image is None or not image.get("value", "").startswith("$"):
        raise BadInput(f"label config has no <Image name={to_name!r} value=\"$...\"> for its RectangleLabels")
    labels = tuple(dict.fromkeys(e.get("value", "") for e in rect.iter("Label") if e.get("value")))
    if not labels:
        raise BadInput("label config's <RectangleLabels> has no <Label value=...>: name what to detect")
    return LabelConfig(rect.get("name", "label"), to_name, image.get("value")[1:], labels)


class ImageFetcher:
    """Bytes of a task's image, never more than ``max_bytes``."""

    def __init__(self, max_bytes: int, *, url: str | None = None, token: str | None = None,
                 allow_paths: bool = False, timeout: float = 30.0) -> None:
        self.max_bytes, self.url, self.token = max_bytes, (url or "").rstrip("/") or None, token
        self.allow_paths, self.timeout = allow_paths, timeout

    def fetch(self, ref: str) -> bytes:
        if not isinstance(ref, str) or not ref:
            raise BadInput("the task has no image reference in its data")
        if ref.startswith("data:"):
            try:
                return self._limit(base64.b64decode(ref.split(",", 1)[1], validate=True))
            except (IndexError, binascii.Error):
                raise BadImage("the task's data: URI is not base64 image data") from None
        if ref.startswith("/data/") or ref.startswith(("http://", "https://")):
            return self._http(ref)
        if self.allow_paths:
            return self._limit(read_file(ref, self.max_bytes))
        raise BadInput(f"{ref!r}: not a Label Studio URL; start the server with --allow-paths to read paths")

    def _http(self, ref: str) -> bytes:
        if self.url is None:
            raise BadInput("the task's image is on Label Studio but the server does not know where Label Studio "
                           "is: start it with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set (or --label-studio-url, "
                           "--label-studio-token)")
        full = self.url + ref if ref.startswith("/") else ref
        if not full.startswith(self.url + "/"):
            # only Label Studio's own files: a task must not make the server fetch arbitrary URLs
            raise BadInput(f"{ref!r} is not on the Label Studio at {self.url}")
        request = urllib.request.Request(full)
        if self.token:  # unredirected: a redirect (to cloud storage, say) must not carry the token on
            request.add_unredirected_header("Authorization", f"Token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return self._limit(response.read(self.max_bytes + 1))
        except (urllib.error.URLError, OSError) as exc:
            raise BadImage(f"cannot fetch {full} ({exc})") from None

    def _limit(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise TooLarge(f"image larger than the server's limit of {self.max_bytes} bytes")
        return data


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """A server-side file's bytes (at most ``max_bytes`` + 1: the caller's limit check sees the excess)."""
    path = Path(path)
    if not path.is_file():
        raise BadImage(f"{path}: no such file on the server")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)

