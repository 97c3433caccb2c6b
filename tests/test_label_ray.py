"""``regionclip label --engine ray``: a local Ray (2 CPUs) writes the plain engine's shards."""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")

from regionclip.label.ray_engine import start_local  # noqa: E402
from test_label import assert_same_rows, label_argv, make_images, run, save_tiny, shard_rows  # noqa: E402


@pytest.mark.ray
def test_ray_engine_writes_the_plain_engines_shards_and_resumes(tmp_path, capsys):
    spec = save_tiny(tmp_path / "model")
    images = make_images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"junk")
    images.append(str(tmp_path / "imgs" / "broken.png"))
    code, _, err = run(label_argv(spec, images, tmp_path / "plain", "--shard-size", "3", "--allow-failures"), capsys)
    assert code == 0, err
    start = time.monotonic()
    start_local(num_cpus=2)
    try:
        # At Ray's default nice 15 a busy neighbour process starves the labelling actor for minutes.
        # (a lambda: Ray's workers cannot import this test module, cloudpickle sends it by value)
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
        argv = label_argv(spec, images, tmp_path / "ray", "--shard-size", "3", "--engine", "ray", "--allow-failures")
        code, stdout, err = run(argv, capsys)
        assert code == 0, err
        assert "11 image(s) labelled (1 failed" in stdout
        assert_same_rows(shard_rows(tmp_path / "ray"), shard_rows(tmp_path / "plain"))
        plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
        on_ray = json.loads((tmp_path / "ray" / "manifest.json").read_text())
        assert {k: v for k, v in plain.items() if k != "sources"} == {k: v for k, v in on_ray.items() if k != "sources"}
        # The engines continue each other's runs: a shard removed is redone by the plain engine, alone.
        (tmp_path / "ray" / "shard-00002.parquet").unlink()
        code, stdout, err = run(label_argv(spec, images, tmp_path / "ray", "--shard-size", "3", "--allow-failures"),
                                capsys)
        assert code == 0 and "3 image(s) labelled" in stdout, err
        assert_same_rows(shard_rows(tmp_path / "ray"), shard_rows(tmp_path / "plain"))
    finally:
        ray.shutdown()
        print(f"ray part: {time.monotonic() - start:.1f} s")
