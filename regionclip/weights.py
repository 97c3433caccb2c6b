"""Where weights come from: resolve a (model, weights) spec to a local file, or fail fast.

Resolution is kept apart from building: ``resolve_clip``/``resolve_detector`` return a local
path (or ``None`` for random init) and never construct a model. Offline they fail within a
few seconds with one line naming the remedy, instead of open_clip's minute of hub retries.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torchvision

from .errors import UnknownModel, WeightsUnavailable

RANDOM = ("none", "random", "")
PROBE_TIMEOUT_S = 3.0
HF_HOST = "huggingface.co"

# Faster R-CNN builders usable as a proposal stage, with their torchvision weights enum.
DETECTORS = {
    "fasterrcnn_resnet50_fpn_v2": torchvision.models.detection.FasterRCNN_ResNet50_FPN_V2_Weights,
    "fasterrcnn_resnet50_fpn": torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights,
    "fasterrcnn_mobilenet_v3_large_fpn": torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    "fasterrcnn_mobilenet_v3_large_320_fpn": torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
}
DETECTOR_TAGS = {"coco": "COCO_V1"}

_REMEDY = "or use the shipped offline model 'demo' (--model demo)"
_probe_cache: dict[str, bool] = {}


@dataclass(frozen=True)
class Resolved:
    """A resolved weights spec: ``path`` is ``None`` for random initialisation."""

    model: str
    spec: str
    path: Path | None

    @property
    def key(self) -> str:
        """Identity for caches keyed by weights (file name + size + mtime for local files)."""
        if self.path is None:
            # Random weights differ per build: never share cached embeddings between two.
            return f"{self.model}/random/{uuid.uuid4().hex}"
        st = self.path.stat()
        return f"{self.model}/{self.path.name}/{st.st_size}/{int(st.st_mtime)}"


def pretrained_cfg(model: str, spec: str) -> dict:
    """open_clip's metadata for the tag ``spec`` of ``model`` (empty for paths and random init)."""
    if str(spec).lower() in RANDOM or Path(str(spec)).expanduser().exists():
        return {}
    return dict(open_clip.get_pretrained_cfg(model, spec) or {})


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included).

    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    if host in _probe_cache:
        return _probe_cache[host]
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    _probe_cache[host] = result[0]
    return result[0]


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or Path(spec).suffix in (
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt"
    )


def _local(model: str, spec: str, what: str) -> Resolved | None:
    p = Path(spec).expanduser()
    if p.is_file():
        return Resolved(model, spec, p)
    if p.is_dir():
        files = sorted(
            q for q in p.iterdir() if q.suffix in (".safetensors", ".bin", ".pt", ".pth")
        )
        if not files:
            raise WeightsUnavailable(f"{what} checkpoint folder {p} holds no .safetensors/.bin/.pt file")
        return Resolved(model, spec, files[0])
    if _looks_like_path(spec):
        raise WeightsUnavailable(f"{what} checkpoint not found: {spec}")
    return None


def resolve_clip(model: str, pretrained: str, cache_dir: str | None = None) -> Resolved:
    """Resolve an open_clip ``model`` + ``pretrained`` (tag, local path or ``none``).

    Tags are looked up in open_clip's table; a cached file is used as is; otherwise the file is
    downloaded when the hub is reachable, and ``WeightsUnavailable`` is raised within seconds
    when it is not (or when ``HF_HUB_OFFLINE`` is set).
    """
    if model not in open_clip.list_models():
        raise UnknownModel(
            f"unknown CLIP architecture '{model}' (see open_clip.list_models(), e.g. ViT-B-16, RN50)"
        )
    if pretrained.lower() in RANDOM:
        return Resolved(model, pretrained, None)
    local = _local(model, pretrained, f"CLIP {model}")
    if local is not None:
        return local
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsUnavailable(
            f"CLIP {model} has no pretrained tag '{pretrained}' (known: {', '.join(tags) or 'none'}); "
            "pass a tag, a local checkpoint path or 'none'"
        )
    cached = _cached_clip_file(cfg, cache_dir)
    if cached is not None:
        return Resolved(model, pretrained, cached)
    host = urlparse(cfg["url"]).hostname if cfg.get("url") and not cfg.get("hf_hub") else HF_HOST
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not host_reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} is unreachable"
        raise WeightsUnavailable(
            f"CLIP weights {model}/{pretrained} are not in the cache and {why}: "
            f"pass clip_pretrained=PATH to a local checkpoint (--clip-pretrained PATH) {_REMEDY}"
        )
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # the hub client raises many types; the remedy is the same
        raise WeightsUnavailable(
            f"downloading CLIP weights {model}/{pretrained} failed ({type(exc).__name__}): "
            f"pass clip_pretrained=PATH (--clip-pretrained PATH) {_REMEDY}"
        ) from None
    return Resolved(model, pretrained, Path(path))


def _cached_clip_file(cfg: dict, cache_dir: str | None) -> Path | None:
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if target.is_file():
            return target
    return None


def resolve_detector(model: str, weights: str) -> Resolved:
    """Resolve a torchvision Faster R-CNN ``model`` + ``weights`` (``coco``, local path, ``none``)."""
    if model not in DETECTORS:
        raise UnknownModel(f"unknown detector '{model}' (known: {', '.join(DETECTORS)})")
    if weights.lower() in RANDOM:
        return Resolved(model, weights, None)
    local = _local(model, weights, f"detector {model}")
    if local is not None:
        return local
    enum = DETECTORS[model]
    member = DETECTOR_TAGS.get(weights.lower(), weights)
    if member not in enum.__members__:
        raise WeightsUnavailable(
            f"detector {model} has no weights '{weights}' (known: coco, "
            f"{', '.join(enum.__members__)}); pass one, a local checkpoint path or 'none'"
        )
    url = enum[member].url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if target.is_file():
        return Resolved(model, weights, target)
    host = urlparse(url).hostname or ""
    if not host_reachable(host):
        raise WeightsUnavailable(
            f"detector weights {model}/{weights} are not in the torch hub cache and {host} is "
            f"unreachable: pass detector_weights=PATH to a local checkpoint (--detector-weights PATH) {_REMEDY}"
        )
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except Exception as exc:
        raise WeightsUnavailable(
            f"downloading detector weights {model}/{weights} failed ({type(exc).__name__}): "
            f"pass detector_weights=PATH (--detector-weights PATH) {_REMEDY}"
        ) from None
    return Resolved(model, weights, target)


def register_clip_config(name: str, config: dict) -> None:
    """Make an open_clip architecture known by name (used for tiny and shipped models)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = config


def load_state(path: Path) -> dict:
    """Load a checkpoint file without executing pickled code (``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}); "
            "pass a .pt/.pth/.safetensors state dict saved with torch.save"
        ) from None
