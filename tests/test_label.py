"""``regionclip label``: shards, manifest, resume, faults (CPU, a tiny saved model, tiny images)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY_DETECTOR, TINY_PROPOSALS, shapes_image, tiny_model

pq = pytest.importorskip("pyarrow.parquet")

from regionclip.label import expand_sources, plan  # noqa: E402
from regionclip.label.shards import assigned, check_layout, layout, parse_part  # noqa: E402
from regionclip.records import load_results  # noqa: E402
from regionclip.errors import BadInput  # noqa: E402
from regionclip_cli.main import main  # noqa: E402

LABELS = "red circle,green square"


def save_tiny(folder) -> str:
    """A tiny model saved as a checkpoint + YAML: the same weights in every process (``--model PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, spec = folder / "tiny.pt", folder / "tiny.yaml"
    tiny_model().save(ckpt)
    spec.write_text(yaml.safe_dump({"clip_model": "test-vit-tiny", "clip_pretrained": "none", "detector": TINY_DETECTOR,
                                    "detector_weights": "none", "checkpoint": str(ckpt), "mode": "crop",
                                    "device": "cpu", "regions": {"box_refinement": False},
                                    "proposals": TINY_PROPOSALS}))
    return str(spec)


def make_images(folder, n: int, size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        cv2.imwrite(str(p), shapes_image(size, size, i)[:, :, ::-1])
        paths.append(str(p))
    return paths


def label_argv(model: str, sources: list[str], out, *extra: str) -> list[str]:
    return ["label", *sources, "--labels", LABELS, "--model", model, "--out", str(out), "--score-threshold", "0",
            "--max-detections", "5", "--batch-size", "4", "--workers", "0", *extra]


def run(argv, capsys=None) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def shard_rows(out) -> list[dict]:
    """Every row of every shard file, in shard order."""
    rows = []
    for f in sorted(os.listdir(out)):
        if f.startswith("shard-") and f.endswith(".parquet"):
            rows += pq.read_table(os.path.join(out, f)).to_pylist()
    return rows


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["image"] for r in a] == [r["image"] for r in b]
    for x, y in zip(a, b):
        assert x["labels"] == y["labels"] and x["error"] == y["error"], x["image"]
        np.testing.assert_allclose(np.asarray(x["boxes_xyxy"] or [], np.float32),
                                   np.asarray(y["boxes_xyxy"] or [], np.float32), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(x["scores"], np.float32), np.asarray(y["scores"], np.float32),
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny_label_model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return make_images(tmp_path_factory.mktemp("label_images"), 10)


# ------------------------------------------------------------------------------ pure parts
def test_shards_are_fixed_size_and_every_split_covers_them_once():
    shards = plan(10, 4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    for part_n, world in ((1, 2), (2, 1), (2, 2), (3, 1)):
        owned = [s.index for i in range(part_n) for r in range(world)
                 for s in assigned(plan(25, 2), (i, part_n), r, world)]
        assert sorted(owned) == list(range(13))
    assert parse_part("1/4") == (1, 4)
    with pytest.raises(BadInput, match="0 <= i < N"):
        parse_part("4/4")


def test_sources_folders_lists_coco_and_tar(tmp_path, images):
    listed = tmp_path / "list.txt"
    listed.write_text(f"{images[1]}\n# a comment\n\n{images[0]}\n")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": os.path.relpath(images[2], tmp_path)}]}))
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as t:
        for i, p in enumerate(images[:2]):
            t.add(p, arcname=f"{i:04d}.png")
            meta = json.dumps({"i": i}).encode()
            info = tarfile.TarInfo(f"{i:04d}.json")
            info.size = len(meta)
            t.addfile(info, io.BytesIO(meta))
    items, problems = expand_sources([str(listed), str(coco), str(tar), os.path.dirname(images[0]) + "/img00[34].png"])
    keys = [str(it) for it in items]
    assert keys[:3] == [images[1], images[0], str(tmp_path / os.path.relpath(images[2], tmp_path))]
    assert keys[3:5] == [f"{tar}::0000.png", f"{tar}::0001.png"] and keys[5:] == images[3:5]
    assert problems == []
    from regionclip.io import load_reduced

    loaded = load_reduced(items[3])
    assert loaded.original_size == (32, 32) and np.array_equal(loaded.pixels, load_reduced(images[0]).pixels)


def test_the_item_list_on_disk_gives_any_shard_and_is_read_lazily(tmp_path):
    from regionclip.label.items import ShardItems, write_items
    from regionclip.label.sources import TarMember, iter_sources

    odd = os.fsdecode(b"/data/caf\xe9.jpg")  # a Latin-1 file name: not UTF-8
    items = [f"/data/{i}.jpg" for i in range(5)] + [TarMember("/t.tar", "a/0.png", 512, 99), odd]
    listing = write_items(tmp_path / "items", iter(items), 3, tmp_path / "items")
    assert (listing.count, len(listing.offsets)) == (7, 3)
    shards = plan(7, 3)
    assert listing.shard(shards[1]) == items[3:6] and listing.keys(shards[2]) == [odd]
    assert list(ShardItems(listing, [shards[2], shards[0]])) == [odd] + items[:3]
    # A text list is read as it is consumed: a bad byte 12 kB in is met there, not before the first path.
    text = tmp_path / "list.txt"
    text.write_bytes(b"a.png\n" + b"x.png\n" * 2000 + b"\xff\n")
    lazy = iter_sources([str(text)], [])
    assert next(lazy) == str(tmp_path / "a.png")
    with pytest.raises(BadInput, match="not a readable list of image paths"):
        list(lazy)


def test_the_ray_engines_decoding_stage_runs_without_torch(tmp_path):
    """What a Ray decoding task does, in a fresh process: import the stage's module, unpickle its
    item list, decode two shards. Torch stays unloaded, so a decoding worker starts in a fraction
    of a second: with torch, each of them paid its import (seconds) on the same cores as the model."""
    import pickle
    import subprocess
    import sys

    from regionclip.label.items import write_items

    images = make_images(tmp_path / "imgs", 3)
    listing = write_items(tmp_path / "items", iter(images + [str(tmp_path / "missing.png")]), 2, tmp_path / "items")
    code = f"""
import pickle, sys
from regionclip.label.ray_engine import _decode_shard
rows = {{"shard": [0, 1], "start": [0, 2], "stop": [2, 4]}}
batches = list(_decode_shard(rows, pickle.loads({pickle.dumps(listing)!r}), 24, 2, "/"))
print(pickle.dumps(batches).hex())
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    decoded, loaded = proc.stdout.splitlines()
    assert loaded == "[]"
    batches = pickle.loads(bytes.fromhex(decoded))
    assert [list(b["key"]) for b in batches] == [images[:2], [images[2], str(tmp_path / "missing.png")]]
    images_out = [pickle.loads(x) for b in batches for x in b["image"] if x]
    assert [im.pixels.shape for im in images_out] == [(24, 24, 3)] * 3
    assert batches[1]["error"][1] and not batches[1]["image"][1]
    # With windows (--tile), an image larger than one is only opened: its actor decodes the windows.
    from regionclip.label.ray_engine import _decode_shard
    from regionclip.tiles import TiledImage, Tiling

    big = write_items(tmp_path / "big", iter(make_images(tmp_path / "big-imgs", 1, size=100)), 2, tmp_path / "big")
    [batch] = _decode_shard({"shard": [0], "start": [0], "stop": [1]}, big, 24, 2, "/", Tiling(64))
    assert isinstance(pickle.loads(batch["image"][0]), TiledImage)


def test_a_file_given_twice_under_two_spellings_is_one_item(tmp_path, images, monkeypatch):
    monkeypatch.chdir(os.path.dirname(images[0]))
    link = tmp_path / "link.png"
    link.symlink_to(images[1])
    items, _ = expand_sources([os.path.basename(images[0]), images[0], images[1], str(link)])
    assert items == [os.path.basename(images[0]), images[1]]


def test_the_split_is_recorded_and_checked():
    lay = layout(2, (0, 3), 4)
    assert {k: lay[k] for k in ("shard_size", "parts", "world_size")} == {"shard_size": 2, "parts": 3, "world_size": 4}
    check_layout(None, lay, "m.json")  # a manifest from before layouts were recorded
    check_layout(layout(2, (0, 1), 8), layout(2, (0, 1), 4), "m.json")  # one part covers every shard at any world size
    for recorded, wanted, said in ((layout(2, (0, 2), 1), layout(2, (0, 3), 1), "--shard i/2 under WORLD_SIZE=1 with"),
                                   (layout(2, (0, 1), 1), layout(2, (0, 3), 1), "--shard i/1 with"),
                                   (layout(2, (1, 2), 1), layout(2, (1, 2), 2), "--shard i/2 under WORLD_SIZE=1 with")):
        with pytest.raises(BadInput, match=f"m.json was split as {said} --shard-size 2; this command asks for"):
            check_layout(recorded, wanted, "m.json")


# ----------------------------------------------------------------------------- the command
def test_a_source_that_does_not_exist_is_one_line_before_the_model_loads(tmp_path, images, capsys, monkeypatch):
    """``--labels red circle,blue square`` unquoted: the shell makes sources of the words."""
    import regionclip_cli.options as O

    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    argv = label_argv("demo", [images[0]], tmp_path / "out")
    i = argv.index("--labels")
    argv[i:i + 2] = ["--labels", "red", "circle,blue", "square"]
    code, stdout, err = run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no such file or directory: 'circle,blue', 'square'" in err and 'quote it: --labels "' in err


def test_parts_of_a_run_split_otherwise_are_one_line(tmp_path, tiny_spec, images, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run(label_argv(tiny_spec, images[:4], out, "--shard-size", "1", "--shard", "0/2"), capsys)
    assert code == 0 and "part 0 of 2: labelling on cpu" in err, err  # every process of a split run says its device
    recorded = json.loads((out / "manifest.json").read_text())["layout"]
    assert (recorded["shard_size"], recorded["parts"], recorded["world_size"]) == (1, 2, 1)
    import regionclip_cli.options as O

    build = O.build_model
    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    for other in (["--shard", "1/3"], []):  # 1/3 would write shard 1 again and never shard 3; no --shard, all again
        code, stdout, err = run(label_argv(tiny_spec, images[:4], out, "--shard-size", "1", *other), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "was split as --shard i/2" in err and "--overwrite" in err
    monkeypatch.setattr(O, "build_model", build)
    code, stdout, err = run(label_argv(tiny_spec, images[:4], out, "--shard-size", "1", "--shard", "1/2"), capsys)
    assert code == 0 and "2 image(s) labelled" in stdout, err
    assert [r["image"] for r in shard_rows(out)] == images[:4]


def test_label_writes_shards_and_manifest_then_resumes(tmp_path, tiny_spec, images, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(label_argv(tiny_spec, images, out, "--shard-size", "4"), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [".items.jsonl", "manifest.json", "shard-00000.parquet", "shard-00001.parquet",
                                       "shard-00002.parquet"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocabulary"] == LABELS.split(",") and manifest["images"] == 10 and manifest["shards"] == 3
    assert manifest["scoring"]["score_threshold"] == 0 and len(manifest["model"]["files"]["checkpoint"]) == 64
    rows = shard_rows(out)
    assert [r["image"] for r in rows] == images
    r = rows[0]
    assert (r["width"], r["height"]) == (32, 32) and r["error"] is None and 1 <= len(r["boxes_xyxy"]) <= 5
    assert all(LABELS.split(",")[i] == name for i, name in zip(r["label_ids"], r["labels"]))
    assert "10 image(s) labelled" in stdout
    # The same command again: nothing to do, the model is never built.
    first = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out) if f.endswith(".parquet")}
    code, stdout, err = run(label_argv(tiny_spec, images, out, "--shard-size", "4"), capsys)
    assert code == 0 and "0 image(s) labelled" in stdout and "3 shard(s) were already complete" in stdout
    assert first == {f: (out / f).stat().st_mtime_ns for f in os.listdir(out) if f.endswith(".parquet")}
    # A shard cut by hand is noticed and redone; the others stay.
    shard1 = out / "shard-00001.parquet"
    shard1.write_bytes(shard1.read_bytes()[:100])
    code, stdout, err = run(label_argv(tiny_spec, images, out, "--shard-size", "4"), capsys)
    assert code == 0 and "4 image(s) labelled" in stdout and "in 1 shard(s)" in stdout
    assert_same_rows(shard_rows(out), rows)
    # read back as Results (what convert reads)
    results = load_results(out)
    assert [im.image for im in results.images] == images and results.vocabulary == LABELS.split(",")


def test_a_manifest_of_another_run_is_one_line_and_exit_2(tmp_path, tiny_spec, images, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run(label_argv(tiny_spec, images[:4], out, "--shard-size", "4"), capsys)
    assert code == 0, err
    import regionclip_cli.options as O

    build = O.build_model
    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    other_model = save_tiny_other(tmp_path)
    for change, what in ((["--labels", "blue triangle"], "vocabulary"), (["--nms-iou", "0.2"], "scoring"),
                         (["--shard-size", "3"], "shard_size"), ("model", "model"), ("images", "images")):
        argv = label_argv(tiny_spec, images[:4], out, "--shard-size", "4")
        if change == "model":
            argv[argv.index(tiny_spec)] = other_model
        elif change == "images":
            argv[1:5] = images[1:6]
        else:
            argv += change
        code, stdout, err = run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"its {what} differs" in err and "--overwrite" in err and "Traceback" not in err
    monkeypatch.setattr(O, "build_model", build)
    code, stdout, err = run(argv + ["--overwrite"], capsys)
    assert code == 0 and "5 image(s) labelled" in stdout, err
    assert [r["image"] for r in shard_rows(out)] == images[1:6]


def save_tiny_other(tmp_path) -> str:
    import torch

    spec = save_tiny(tmp_path / "other")
    ckpt = torch.load(tmp_path / "other" / "tiny.pt", weights_only=False)
    key = next(k for k, v in ckpt["clip"].items() if v.is_floating_point())
    ckpt["clip"][key] = ckpt["clip"][key] + 1.0  # other weights, same config
    torch.save(ckpt, tmp_path / "other" / "tiny.pt")
    return spec


def test_bad_images_are_recorded_and_counted(tmp_path, tiny_spec, images, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"garbage")
    (bad / "empty.png").write_bytes(b"")
    listed = tmp_path / "list.txt"  # a listed path that does not exist is a failure (a source argument is refused)
    listed.write_text(str(tmp_path / "missing.jpg"))
    sources = [images[0], str(bad / "corrupt.jpg"), str(bad / "empty.png"), str(listed), images[1]]
    out = tmp_path / "out"
    code, stdout, err = run(label_argv(tiny_spec, sources, out, "--shard-size", "2"), capsys)
    assert code == 3 and "3 failed" in stdout and "Traceback" not in err
    assert "--allow-failures" in err
    rows = shard_rows(out)
    keys = [*sources[:3], str(tmp_path / "missing.jpg"), sources[4]]
    assert [r["image"] for r in rows] == keys  # the rest was finished
    reasons = {r["image"]: r["error"] for r in rows}
    assert "not a readable image" in reasons[keys[1]] and "file is empty" in reasons[keys[2]]
    assert "no such file" in reasons[keys[3]] and reasons[keys[0]] is None and reasons[keys[4]] is None
    assert rows[1]["width"] is None and rows[1]["boxes_xyxy"] == []
    code, stdout, err = run(label_argv(tiny_spec, sources, tmp_path / "out2", "--shard-size", "2",
                                       "--allow-failures"), capsys)
    assert code == 0 and "3 failed" in stdout, err
    # Resumed with nothing left to do, the failures recorded earlier still decide the exit code.
    code, stdout, err = run(label_argv(tiny_spec, sources, out, "--shard-size", "2"), capsys)
    assert code == 3 and "0 image(s) labelled" in stdout and "3 image(s) could not be decoded, 3 of them" in err
    code, stdout, err = run(label_argv(tiny_spec, sources, out, "--shard-size", "2", "--allow-failures"), capsys)
    assert code == 0, err


@pytest.mark.parametrize("errno_, strerror", [(30, "Read-only file system"), (28, "No space left on device")])
def test_unwritable_output_is_one_line_before_the_model_loads(tmp_path, images, capsys, monkeypatch, errno_, strerror):
    import regionclip.outputs
    import regionclip_cli.options as O

    monkeypatch.setattr(O, "build_model", lambda *a, **k: pytest.fail("the model was built"))

    def refuse(*args, **kwargs):  # a read-only mount or a full disk (chmod does not stop root)
        raise OSError(errno_, strerror)

    monkeypatch.setattr(regionclip.outputs.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(regionclip.outputs.tempfile, "mkdtemp", refuse)
    code, _, err = run(label_argv("demo", images[:2], tmp_path / "out"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {tmp_path / 'out'}: cannot create" in err and strerror in err


def test_label_without_pyarrow_says_how_to_install(tmp_path, images, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    code, _, err = run(label_argv("demo", images[:2], tmp_path / "out"), capsys)
    assert code == 2 and err.strip() == ('error: regionclip label needs pyarrow: pip install -e ".[label]" (or pip install pyarrow)')


def test_embeddings_are_stored_fp16_per_box(tmp_path, tiny_spec, images, capsys):
    out = tmp_path / "out"
    code, _, err = run(label_argv(tiny_spec, images[:3], out, "--embeddings", "--workers", "2", "--batch-size", "1"),
                       capsys)
    assert code == 0, err
    table = pq.read_table(out / "shard-00000.parquet")
    import pyarrow as pa

    kind = table.schema.field("embeddings").type
    assert pa.types.is_list(kind) and pa.types.is_list(kind.value_type) and pa.types.is_float16(kind.value_type.value_type)
    rows = table.to_pylist()
    for r in rows:
        emb = np.asarray(r["embeddings"], np.float32)
        assert emb.shape == (len(r["boxes_xyxy"]), 32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    assert json.loads((out / "manifest.json").read_text())["embeddings"] is True


def test_label_takes_a_vocabulary_file_and_resumes_only_with_the_same_one(tmp_path, tiny_spec, images, capsys):
    """--vocab (synonyms, negatives, per-class thresholds): the shards hold what the predictor gives
    for that vocabulary, the manifest records it, and a changed file is another run (exit 2)."""
    from regionclip.predictor import Predictor
    from regionclip.vocabulary import Vocabulary

    spec = {"red circle": {"prompts": ["red circle", "red disc"]}, "green square": {"negatives": ["blue square"]}}
    vocab = tmp_path / "vocab.yaml"
    vocab.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    argv = label_argv(tiny_spec, images[:4], out, "--shard-size", "4")
    argv[argv.index("--labels"):argv.index("--labels") + 2] = ["--vocab", str(vocab)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocabulary"] == ["red circle", "green square"]
    assert manifest["vocabulary_spec"]["classes"]["green square"]["negatives"] == ["blue square"]
    net = Predictor.from_pretrained(tiny_spec, device="cpu")
    want = net.detect(images[:4], vocab=Vocabulary.from_dict(spec), score_threshold=0.0, max_detections=5)
    rows = shard_rows(out)
    for row, d in zip(rows, want):
        assert row["labels"] == d.names
        np.testing.assert_allclose(np.asarray(row["scores"], np.float32), d.scores.numpy(), atol=1e-5)
    spec["red circle"]["threshold"] = 0.9
    vocab.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, _, err = run(argv, capsys)
    assert code == 2 and "vocabulary_spec differs" in err, err
