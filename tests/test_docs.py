"""Every fenced code block of README.md and docs/**/*.md runs here, so none goes stale (issue 21).

What a block's language means:
- ``python``: executed in a fresh namespace, in a temporary folder holding ``photo.jpg`` (a
  generated shapes image standing in for the reader's photo). Blocks are self-contained: each one
  builds what it uses (the demo model loads in about a second).
- ``bash``: one command per line (``\\`` continuations joined, ``&&`` split, ``#`` comments
  dropped), run in the same kind of folder, in order:
  ``regionclip ...`` runs in this process through the CLI's ``main`` and must exit 0;
  ``python -c CODE`` runs CODE; ``python SCRIPT.py ARGS`` runs the script with ARGS;
  ``python -m pytest -q`` must be the test command of ``.ci/run``; ``pip install`` is never run,
  its extras must exist in pyproject.toml and its pins must fit the project's dependencies;
  ``torchrun ... -m regionclip.train ARGS`` is ``regionclip train ARGS`` (``regionclip.label`` likewise).
- ``yaml`` / ``json``: parsed. ``text``: not run (diagrams, output shown to the reader).

A block whose fence is preceded by ``<!-- doc-test: parse-only (why) -->`` needs what the tests
cannot have (pretrained weights, COCO, a GPU, minutes of training): it is checked, not run.
``regionclip`` lines go through click's parser for that command (every option must be a real
option of that command, values of its types, required arguments present), ``--model`` must name
a preset or a path, ``--set`` keys must exist in the model or training config, and paths into the
repository (``configs/...``, ``examples/...``) must exist; scripts' arguments go through their
own argparse parser; Python is compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(.*)$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*([\w-]+)")
MODES = {"run", "parse-only"}
LANGUAGES = {"python", "bash", "yaml", "json", "text"}
REPO_DIRS = ("configs/", "examples/", "benchmarks/", "regionclip/", "tests/", "docs/", "cli/")

# Blocks expected to fail until a fix from another branch merges: a substring of the block -> reason.
# strict: once the fix lands the test fails, and the mark is removed.
XFAIL: dict[str, str] = {}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    mode: str  # "run" or "parse-only"
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, with the doc-test marker on the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = m.group(1), m.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        mode = marker.group(1) if marker else "run"
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end]) + "\n"
        out.append(Block(page, i + 1, language, mode, code))
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def cases():
    for block in BLOCKS:
        marks = [pytest.mark.xfail(strict=True, reason=reason)
                 for needle, reason in XFAIL.items() if needle in block.code and block.mode == "run"]
        yield pytest.param(block, id=block.id, marks=marks)


# ---- shell commands -----------------------------------------------------------------------------

def commands(code: str) -> list[list[str]]:
    """Command lines of a shell block: continuations joined, comments dropped, ``&&`` split."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            if "&&" in words:
                k = words.index("&&")
                out.append(words[:k])
                words = words[k + 1:]
            else:
                out.append(words)
                words = []
    for words in out:
        bad = [w for w in words if w in ("|", "||", ";", ">", ">>", "<", "&")]
        if bad or not words:
            raise AssertionError(f"shell syntax the doc tests do not model: {' '.join(words)!r}")
    return out


def cli_group() -> click.Group:
    import typer.main

    from regionclip_cli.main import app

    return typer.main.get_command(app)


def run_cli(args: list[str]) -> None:
    """``regionclip ARGS`` in this process; exit code 0 or an AssertionError naming the command."""
    from regionclip_cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    assert code == 0, f"`regionclip {shlex.join(args)}` exited {code}"


def parse_cli(args: list[str]) -> None:
    """Check ``regionclip ARGS`` against the CLI without running the command's body."""
    group = cli_group()
    assert args and args[0] in group.commands, f"`regionclip {args[0] if args else ''}`: no such command (have {sorted(group.commands)})"
    name, rest = args[0], args[1:]
    command = group.commands[name]
    if "--help" in rest:
        return
    try:
        ctx = command.make_context(f"regionclip {name}", list(rest))
    except click.exceptions.ClickException as exc:
        raise AssertionError(f"`regionclip {shlex.join(args)}`: {exc.format_message()}") from None
    params = ctx.params
    for word in rest:
        if word.startswith(REPO_DIRS) and not any(c in word for c in "*?"):
            assert (ROOT / word).exists(), f"`regionclip {shlex.join(args)}`: {word} is not in the repository"
    check_sets(name, params)


def check_sets(name: str, params: dict) -> None:
    """``--set`` keys must exist in the config they override (a preset's or a training config's)."""
    sets = list(params.get("set_") or [])
    if name == "train":
        from regionclip.train.config import load_train_config

        config = Path(params["config"])
        if (ROOT / config).is_file():
            load_train_config(ROOT / config, sets)
        return
    model = params.get("model")
    if model is None:
        return
    from regionclip.config import model_preset_path

    if "/" not in model and not model.endswith((".yaml", ".yml")):
        assert model_preset_path(model) is not None, f"--model {model}: no such preset in configs/models/"
        if sets:
            from regionclip.detector import resolve_model_config

            resolve_model_config(model, sets)


class _Parsed(Exception):
    """Raised by the patched argparse once a script's arguments parsed."""


def run_script(script: str, args: list[str], parse_only: bool, monkeypatch) -> None:
    path = ROOT / script if not Path(script).is_absolute() else Path(script)
    assert path.is_file(), f"`python {script}`: no such file in the repository"
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    if parse_only:
        parse = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            parse(self, args, namespace)
            raise _Parsed

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            runpy.run_path(str(path), run_name="__main__")
    else:
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), f"`python {script} {shlex.join(args)}` exited {exc.code}"


def check_pip(words: list[str]) -> None:
    """``pip install``: the extras exist and pinned packages fit the project's own requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    args = words[words.index("install") + 1:]
    skip_next = False
    for word in args:
        if skip_next:
            skip_next = False
            continue
        if word in ("--index-url", "--extra-index-url", "-r", "--constraint", "-c"):
            skip_next = True
            continue
        if word.startswith("-"):
            continue
        if word.startswith("."):
            extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
            assert extras, f"pip install {word}: not the project"
            for extra in filter(None, (extras.group(1) or "").split(",")):
                assert extra in project["optional-dependencies"], f"pip install {word}: no extra {extra!r} in pyproject.toml"
            continue
        req = Requirement(word)
        assert req.name in deps, f"pip install {word}: {req.name} is not a dependency of the project"
        for spec in req.specifier:
            if spec.operator == "==":
                assert deps[req.name].specifier.contains(spec.version), f"pip install {word}: outside {deps[req.name]}"


def run_shell(block: Block, monkeypatch) -> None:
    parse_only = block.mode == "parse-only"
    for words in commands(block.code):
        program, args = words[0], words[1:]
        if program == "regionclip":
            parse_cli(args) if parse_only else run_cli(args)
        elif program == "torchrun":
            assert "-m" in args, f"torchrun without -m: {shlex.join(words)}"
            module, rest = args[args.index("-m") + 1], args[args.index("-m") + 2:]
            assert module in ("regionclip.train", "regionclip.label"), f"torchrun -m {module}: not modelled"
            command = module.split(".")[1]
            assert (ROOT / f"regionclip/{command}/__main__.py").is_file()
            parse_cli([command, *rest])
        elif program == "pip" or words[:3] == ["python", "-m", "pip"]:
            assert "install" in words, f"only pip install is modelled: {shlex.join(words)}"
            check_pip(words)
        elif words[:3] == ["python", "-m", "pytest"]:
            ci = (ROOT / ".ci/run").read_text().splitlines()
            assert shlex.join(words) in ci, f"`{shlex.join(words)}` is not what .ci/run runs"
        elif words[:2] == ["python", "-c"]:
            code = compile(words[2], f"{block.id} (python -c)", "exec")
            if not parse_only:
                exec(code, {"__name__": "__main__"})
        elif program == "python" and args and args[0].endswith(".py"):
            run_script(args[0], args[1:], parse_only, monkeypatch)
        else:
            raise AssertionError(f"{block.id}: a command the doc tests do not model: {shlex.join(words)}")


# ---- the tests ----------------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder as the cwd, holding photo.jpg; one torch thread (small tensors, shared cores)."""
    from regionclip.data.shapes import render_shapes_image

    image, _ = render_shapes_image(np.random.default_rng(1), size=(192, 256), empty_prob=0.0)
    Image.fromarray(image).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", list(cases()))
def test_block(block: Block, workdir, monkeypatch):
    assert block.mode in MODES, f"{block.id}: unknown doc-test mode {block.mode!r} (have {sorted(MODES)})"
    assert block.language in LANGUAGES, f"{block.id}: give the fence a language, one of {sorted(LANGUAGES)}"
    if block.language == "python":
        code = compile(block.code, block.id, "exec")
        if block.mode == "run":
            exec(code, {"__name__": "__main__"})
    elif block.language == "bash":
        run_shell(block, monkeypatch)
    elif block.language == "yaml":
        yaml.safe_load(block.code)
    elif block.language == "json":
        json.loads(block.code)


def test_every_page_is_collected_and_in_the_site():
    """The test sees README.md and every docs page, and mkdocs.yml's nav lists every page."""
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(entry.values())) for entry in nav}
    assert pages == listed, f"docs pages not in mkdocs.yml's nav, or nav entries without a page: {pages ^ listed}"
    assert {b.page for b in BLOCKS} >= {ROOT / "README.md"}
    for needle in XFAIL:
        assert sum(needle in b.code for b in BLOCKS) == 1, f"XFAIL entry {needle!r} must match exactly one block"


def test_ci_runs_the_readme_commands():
    """.ci/run installs the extras the README installs, builds the site strictly, runs the README's test command."""
    readme = [b for b in BLOCKS if b.page.name == "README.md" and b.language == "bash"]
    install, tests = readme[0], readme[1]
    ci = (ROOT / ".ci/run").read_text().splitlines()
    *_, test_command = commands(tests.code)
    assert shlex.join(test_command) == "python -m pytest -q" and "python -m pytest -q" in ci
    # The first command stays lean (the base install); the test command installs dev first.
    assert re.search(r"pip install -e \.( |$)", install.code), install.code
    extras = re.search(r'"\.\[([\w,-]+)\]"', tests.code).group(1)
    assert any(f'-e ".[{extras}]"' in line and "pip install" in line for line in ci), ci
    assert any(line.split("#")[0].strip().endswith("mkdocs build --strict --site-dir site") for line in ci), ci
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(dev["docs"]) <= set(dev["dev"]), "the dev extra includes the docs extra"


def test_readme_stays_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", text).group(1)
    assert (ROOT / picture).is_file() and (ROOT / picture).stat().st_size < 200_000
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


# ---- the checker itself fails on stale blocks ---------------------------------------------------

STALE = [
    ("bash", "run", "regionclip detect photo.jpg --model demo --no-such-flag 1\n", "no-such-flag"),
    ("bash", "parse-only", "regionclip detect photo.jpg --labelz dog\n", "labelz"),
    ("bash", "parse-only", "regionclip detekt photo.jpg\n", "no such command"),
    ("bash", "parse-only", "regionclip eval --images val/ --model demo\n", "annotations"),
    ("bash", "parse-only", "regionclip detect img.jpg --model rn51\n", "no such preset"),
    ("bash", "parse-only", "regionclip train configs/train/nope.yaml\n", "not in the repository"),
    ("bash", "parse-only", "regionclip train configs/train/shapes_demo.yaml --set optim.lrr=1\n", "lrr"),
    ("bash", "parse-only", "regionclip bench --model rn50 --set proposals.num_proposal=3\n", "num_proposal"),
    ("bash", "parse-only", "python examples/bench_soft_nms.py\n", "no such file"),
    ("bash", "parse-only", "python benchmarks/bench_soft_nms.py --pairs 3\n", ""),
    ("bash", "parse-only", 'pip install -e ".[docz]"\n', "docz"),
    ("bash", "parse-only", "pip install torch==1.0\n", "outside"),
    ("bash", "parse-only", "python -m pytest -x\n", ".ci/run"),
    ("bash", "parse-only", "cd somewhere\n", "do not model"),
    ("python", "run", "from regionclip import RegionCLIP\nRegionCLIP.from_pretrained('demo').detect_all('photo.jpg')\n", "detect_all"),
    ("python", "parse-only", "print('unclosed'\n", ""),
    ("rust", "run", "fn main() {}\n", "language"),
]


@pytest.mark.parametrize("language,mode,code,message", STALE, ids=[s[2].split("\n")[0][:40] for s in STALE])
def test_a_stale_block_fails(language, mode, code, message, workdir, monkeypatch, capsys):
    block = Block(ROOT / "README.md", 0, language, mode, code)
    with pytest.raises((AssertionError, Exception, SystemExit)) as info:
        test_block(block, workdir, monkeypatch)
    assert info.type is not _Parsed
    assert message in str(info.value) + capsys.readouterr().err, str(info.value)


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (as .ci/run runs it): a broken link or anchor between pages fails."""
    pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
