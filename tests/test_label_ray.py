"""``regionclip label --engine ray``: a local Ray (2 CPUs, one for the whole module) writes the plain
engine's shards, from workers; the driver gets counts, never rows."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")

import regionclip  # noqa: E402
from regionclip.label import store  # noqa: E402
from regionclip.label.ray_engine import _Labeller, start_local  # noqa: E402
from regionclip.label.shards import Shard  # noqa: E402
from test_label import LABELS, assert_same_rows, label_argv, make_images, run, save_tiny, shard_rows  # noqa: E402

# The columns of what the labelling actors return: counts per shard.
REPORT = {"shard", "images", "failed", "detections", "failures", "decoded_here"}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module; the plain runs here use the actor's two threads, so that
    both engines sum convolutions in the same order (a near-tie at NMS keeps another box else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    start = time.monotonic()
    start_local(num_cpus=2)
    try:
        # At Ray's default nice 15 a busy neighbour process starves the labelling actor for minutes.
        # (lambdas: Ray's workers cannot import this test module, cloudpickle sends them by value)
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
        # The workers import this checkout's regionclip, not another installed copy.
        assert ray.get(ray.remote(lambda: __import__("regionclip").__file__).remote()) == regionclip.__file__
        yield
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
        print(f"ray module: {time.monotonic() - start:.1f} s")


@pytest.mark.ray
def test_a_killed_run_resumed_by_either_engine_equals_the_plain_run_and_the_driver_gets_no_rows(
        tmp_path, capsys, cluster, monkeypatch):
    spec = save_tiny(tmp_path / "model")
    images = make_images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"junk")
    images.append(str(tmp_path / "imgs" / "broken.png"))
    plain_argv = label_argv(spec, images, tmp_path / "plain", "--shard-size", "3", "--allow-failures")
    code, _, err = run(plain_argv, capsys)
    assert code == 0, err
    rows = shard_rows(tmp_path / "plain")

    # A run killed mid-way (one Ray run costs ~10 s here, so the kill is staged): shard 1 never
    # merged, a stale part of it left behind; shard 3 (the broken image's) not labelled yet.
    out = tmp_path / "ray"
    shutil.copytree(tmp_path / "plain", out)
    (out / "shard-00001.parquet").unlink()
    (out / "shard-00003.parquet").unlink()
    store.write_part(out, Shard(1, 3, 6), [0], [{**rows[3], "labels": ["stale"]}], False)

    # What the driver receives: every batch Ray hands it; and it writes no shard itself.
    received = []
    iter_batches = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append(batch)
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    monkeypatch.setattr(store, "write_shard", lambda *a, **k: pytest.fail("the driver wrote a shard"))
    code, stdout, err = run(label_argv(spec, images, out, "--shard-size", "3", "--engine", "ray", "--allow-failures"),
                            capsys)
    assert code == 0, err
    assert "5 image(s) labelled (1 failed" in stdout and "2 shard(s) were already complete" in stdout, stdout
    assert received and all(set(b) == REPORT for b in received), [set(b) for b in received]
    assert sum(int(n) for b in received for n in b["images"]) == 5
    assert sum(int(n) for b in received for n in b["decoded_here"]) == 0  # decoding: a stage of its own
    assert_same_rows(shard_rows(out), rows)
    assert not (out / store.PARTS).exists()  # every part merged, the stale one replaced, all removed
    monkeypatch.undo()

    # The plain engine continues a Ray run killed the same way.
    (out / "shard-00002.parquet").unlink()
    store.write_part(out, Shard(2, 6, 9), [1], [{**rows[7], "labels": ["stale"]}], False)
    code, stdout, err = run(label_argv(spec, images, out, "--shard-size", "3", "--allow-failures"), capsys)
    assert code == 0 and "3 image(s) labelled" in stdout, err
    assert_same_rows(shard_rows(out), rows)
    assert not (out / store.PARTS).exists()


def test_a_labelling_actor_resolves_the_vocabulary_once(tmp_path, monkeypatch):
    """The actor, called in this process: two batches, the vocabulary embedded once; rows go to parts."""
    import pickle

    import numpy as np
    import yaml

    from regionclip.config import from_dict, ModelConfig
    from regionclip.io import load_reduced
    from regionclip.predictor import Predictor

    spec = save_tiny(tmp_path / "model")
    cfg = from_dict(ModelConfig, yaml.safe_load(open(spec)), where=spec)
    images = make_images(tmp_path / "imgs", 3)
    calls = []  # what embeds a vocabulary: the text tower over plain labels, or compiling a Vocabulary
    for name in ("vocabulary", "compile"):
        monkeypatch.setattr(Predictor, name, lambda self, *a, _f=getattr(Predictor, name), **k: calls.append(1) or _f(self, *a, **k))
    actor = _Labeller(cfg, LABELS.split(","), {"score_threshold": 0.0}, 2, False, str(tmp_path / "out"),
                      {0: (0, 3)}, threads=None)

    def batch(positions):
        return {"shard": np.array([0] * len(positions)), "position": np.array(positions),
                "key": np.array([images[p] for p in positions], dtype=object),
                "image": np.array([pickle.dumps(load_reduced(images[p])) for p in positions], dtype=object),
                "error": np.array([""] * len(positions), dtype=object), "decoder": np.array([0] * len(positions))}

    reports = [actor(batch([0, 1])), actor(batch([2]))]
    assert len(calls) == 1
    assert [int(r["images"][0]) for r in reports] == [2, 1] and set(reports[0]) == REPORT
    store.merge_parts(tmp_path / "out", Shard(0, 0, 3), False)
    assert [r["image"] for r in shard_rows(tmp_path / "out")] == images
