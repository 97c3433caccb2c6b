"""Reading a training YAML's text: where its relative paths point, and ``--set`` overrides that
reach into its ``stages``.

Paths. The rule (also in ``regionclip.train.config``'s docstring and the training docs):

- An *input* path in the file (``data.*`` files and folders, ``model.checkpoint``, and
  ``model.clip_pretrained`` / ``model.detector_weights`` / ``pretrain.teacher`` when they name a
  file rather than a tag or preset) is read relative to the config file's own folder when it
  exists there, else relative to the project root: the nearest folder at or above the config
  that holds ``pyproject.toml`` (the checkout, for ``configs/train/*.yaml``). A path that exists
  in neither place is taken from the project root (from the config's folder when there is no
  project root), so the error that follows names one absolute path; a tag or preset name
  (``openai``, ``coco``, ``rn50``) is left as it is.
- *Outputs* (``out_dir``, ``model.text.cache_dir``) stay relative to the current folder, as do
  ``--out`` and every ``--set`` value: what a user types is read where they type it.

So the shipped configs (``data/shapes/...``, ``configs/splits/...``, relative to the checkout)
run from any folder, and a user's config beside their data can say ``train_images: images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import apply_overrides
from ..errors import BadConfig

# Dotted keys that always hold an input path, and those that may instead hold a name.
INPUT_PATHS = ("data.train_annotations", "data.train_images", "data.val_annotations", "data.val_images",
               "data.split", "data.train_captions", "data.concepts", "model.checkpoint",
               "retention.annotations", "retention.images", "retention.split", "retention.replay_images")
NAME_OR_PATH = ("model.clip_pretrained", "model.detector_weights", "pretrain.teacher")


def project_root(config: str | Path) -> Path | None:
    """The nearest folder at or above ``config``'s folder that holds ``pyproject.toml``, or None."""
    folder = Path(config).resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def resolve_input(value: str, config: str | Path, must_be_path: bool = True) -> str:
    """One relative path ``value`` from the file ``config``, by the rule above (absolute and
    ``~`` paths are only expanded). ``must_be_path=False``: left as it is unless it exists."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here, root = Path(config).resolve().parent, project_root(config)
    bases = [here] + ([root] if root is not None and root != here else [])
    for base in bases:
        if (base / path).exists():
            return str(base / path)
    return str(bases[-1] / path) if must_be_path else value


def resolve_paths(data: dict[str, Any], config: str | Path) -> dict[str, Any]:
    """``data`` (a training YAML's mapping, before any override) with its input paths resolved
    against ``config``'s folder or project root, in the file's sections and in each
    ``stages`` entry. Returns a new mapping; values of the wrong type are left for the type check."""
    out = _resolve_section(data, config)
    if isinstance(out.get("stages"), list):
        out["stages"] = [_resolve_section(s, config) if isinstance(s, dict) else s for s in out["stages"]]
    return out


def with_start_model(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``from_model``'s config (a preset name, preset YAML or run folder; read where
    ``--model`` reads it) under its ``model`` section: keys the file or ``--set`` gives win.
    A top-level ``from_model`` that is not a string is left for the type check."""
    spec = data.get("from_model")
    if not isinstance(spec, str) or not spec:
        return data
    from ..config import run_preset_path, to_dict
    from ..model import resolve_model_config

    preset = str(run_preset_path(spec) or spec)
    try:
        start = to_dict(resolve_model_config(preset))
    except BadConfig as exc:
        raise BadConfig(f"from_model {spec}: {exc}") from None
    own = data.get("model") if isinstance(data.get("model"), dict) else {}
    return {**data, "model": merged(start, own)}


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in at every depth: a stage's ``model: {proposals: {source: x}}``
    changes that one key and keeps the file's other proposal settings."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_section(data: dict[str, Any], config: str | Path) -> dict[str, Any]:
    out = dict(data)
    for keys, must in [(k, True) for k in INPUT_PATHS] + [(k, False) for k in NAME_OR_PATH]:
        section, name = keys.split(".")
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name]:
            out[section] = {**node, name: resolve_input(node[name], config, must)}
    return out


def apply_train_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides in order; ``stages.NAME.key=value`` changes the stage
    entry named NAME (``stages.*.key=value``: every stage; ``stages.2.key=value``: the third).

    A plain ``optim.max_steps=3`` changes the file's own sections, which a stage that sets
    ``optim.max_steps`` itself overrides (``unreached_overrides`` lists those).
    Raises ``BadConfig`` naming the stages there are when NAME is not one of them.
    """
    for item in overrides:
        dotted = item.split("=", 1)[0].strip()
        if not dotted.startswith("stages.") or "=" not in item:
            apply_overrides(data, [item])
            continue
        _, which, *rest = dotted.split(".")
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise BadConfig(f"override '{item}': this config has no stages (no stages: list)")
        if not rest:
            raise BadConfig(f"override '{item}' must name a key inside the stage, e.g. stages.{which}.optim.max_steps=3")
        for entry in _stage_entries(stages, which, item):
            apply_overrides(entry, [".".join(rest) + "=" + item.split("=", 1)[1]])
    return data


def _stage_entries(stages: list, which: str, item: str) -> list[dict]:
    entries = [s for s in stages if isinstance(s, dict)]
    names = [str(s.get("name")) for s in entries]
    if which == "*":
        return entries
    if which in names:
        return [entries[names.index(which)]]
    if which.isdigit() and int(which) < len(entries):
        return [entries[int(which)]]
    raise BadConfig(f"override '{item}': no stage named '{which}'; this config's stages are {', '.join(names)} "
                    "(or * for all)")


def unreached_overrides(stages: Sequence[dict], overrides: Sequence[str]) -> list[str]:
    """One line per plain override (not ``stages.*``) that a stage does not see because its entry
    in ``stages`` sets the same key to another value, with the override that would reach it."""
    lines = []
    for item in overrides:
        dotted, _, raw = item.partition("=")
        keys = dotted.strip().split(".")
        if keys[0] == "stages" or not raw:
            continue
        value = yaml.safe_load(raw) if raw.strip() else ""
        for entry in stages:
            if any(o.startswith((f"stages.{entry.get('name')}.{dotted.strip()}=", f"stages.*.{dotted.strip()}="))
                   for o in overrides):
                continue  # the user set this stage's value too
            node: Any = entry
            for key in keys:
                node = node.get(key, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING and not _same(node, value):
                name = entry.get("name")
                lines.append(f"--set {item} does not reach stage {name}, which sets {dotted} to {node}: "
                             f"use --set stages.{name}.{item} (or stages.*.{item} for every stage)")
    return lines


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    """Equal as the config reads them: YAML reads ``3e-4`` as a string, the field as a float."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
