"""``regionclip label`` across processes: SIGKILL and resume, two gloo ranks, ``--shard i/N``."""

from __future__ import annotations

import os
import random
import runpy
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("pyarrow")

from conftest import run_ranks, shrink_before_fork  # noqa: E402
from test_label import assert_same_rows, label_argv, make_images, run, save_tiny, shard_rows  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here on one thread, as the forked ranks set it and xdist's workers have it: with
    two, convolutions sum in another order and a near-tie at NMS can keep another box, so the
    comparisons failed under `pytest -n 0` (whose process has two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("label_procs")
    spec = save_tiny(root / "model")
    images = make_images(root / "images", 20)  # 7 shards of 3 (the last of 2)
    reference = root / "reference"
    code, _, _ = run(label_argv(spec, images, reference, "--shard-size", "3"))
    assert code == 0
    return spec, images, shard_rows(reference)


def _shards(out: Path) -> int:
    return len(list(out.glob("shard-*.parquet"))) if out.is_dir() else 0


def _label_then_exit(argv: list[str]) -> None:
    torch.set_num_threads(1)
    sys.exit(run(argv)[0])


@pytest.mark.slow
def test_sigkill_at_three_random_points_then_resume(setup, tmp_path):
    """Killed three times mid-run (after a random number of shards, plus a random delay so some
    kills land inside a shard or a write), then resumed: every image exactly once, the same records.
    The killed runs are forks of this process (a fresh interpreter each cost 5-8 s of imports under
    load); the resume goes through the module entry point that torchrun starts."""
    spec, images, reference = setup
    out = tmp_path / "out"
    argv = label_argv(spec, images, out, "--shard-size", "3")
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    shrink_before_fork()
    rng = random.Random(int(os.environ.get("LABEL_KILL_SEED", time.time_ns() % 10_000)))
    # The first run dies the moment its (early) shard lands, so at least one run is surely killed;
    # the others after a random delay as well, so some kills land inside a shard or a write.
    targets = sorted([rng.randint(1, 3), *rng.sample(range(1, 7), 2)])
    codes = []
    for n, target in enumerate(targets):
        proc = context.Process(target=_label_then_exit, args=(argv,))
        proc.start()
        deadline = time.monotonic() + 120  # a hang guard, not a speed check
        while _shards(out) < target and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3) if n else 0)
        proc.kill()
        proc.join()
        codes.append(proc.exitcode)
        assert proc.exitcode in (-signal.SIGKILL, 0), f"the labelling run failed (exit {proc.exitcode})"
    assert -signal.SIGKILL in codes, f"no run was killed before it finished (targets {targets})"
    saved, sys.argv = sys.argv, ["regionclip.label", *argv[1:]]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_module("regionclip.label", run_name="__main__")
    finally:
        sys.argv = saved
    assert done.value.code in (0, None)
    assert not list(out.glob(".shard-*")), "temporaries of killed writes are left behind"
    rows = shard_rows(out)
    assert sorted(r["image"] for r in rows) == sorted(images) and len(rows) == len(images)
    assert_same_rows(rows, reference)


def _rank_worker(rank: int, world: int, port: int, argv: list[str], folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code, _, _ = run(argv)
    Path(folder, f"rank{rank}.code").write_text(str(code))


def test_two_gloo_ranks_write_the_shards_of_one_process(setup, tmp_path):
    spec, images, reference = setup
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = label_argv(spec, images, out, "--shard-size", "3")
    run_ranks(_rank_worker, (2, port, argv, str(tmp_path)), minutes=5)
    assert [(tmp_path / f"rank{r}.code").read_text() for r in range(2)] == ["0", "0"]
    assert_same_rows(shard_rows(out), reference)


def test_shard_parts_write_the_shards_of_one_process(setup, tmp_path, capsys):
    spec, images, reference = setup
    out = tmp_path / "out"
    for i in (2, 0, 1):
        code, stdout, err = run(label_argv(spec, images, out, "--shard-size", "3", "--shard", f"{i}/3"), capsys)
        assert code == 0, err
        assert f"in {len(range(i, 7, 3))} shard(s)" in stdout
    assert_same_rows(shard_rows(out), reference)


def _alive(pid: int, started: str) -> bool:
    """``pid`` still runs (not a zombie) and is the process that started at ``started``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started


def _children(pid: int) -> dict[int, str]:
    """The children of ``pid`` (from /proc, every process's parent), each with its start time."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found[int(entry.name)] = fields[19]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_decoding_workers_die_with_a_sigkilled_run(setup, tmp_path):
    """A run killed by SIGKILL (a scheduler, the OOM killer) leaves no DataLoader worker behind.
    Chunks of 4 images of 128 px outgrow the 64 kB pipe the workers write to, so without
    PR_SET_PDEATHSIG a worker hangs at exit joining its queue's feeder thread."""
    spec, _, _ = setup
    images = make_images(tmp_path / "images", 48, 128)
    argv = label_argv(spec, images, tmp_path / "out", "--workers", "2", "--batch-size", "4", "--shard-size", "4")
    shrink_before_fork()
    proc = mp.get_context("fork").Process(target=_label_then_exit, args=(argv,))
    proc.start()
    deadline = time.monotonic() + 120  # a hang guard, not a speed check
    workers: dict[int, str] = {}
    while len(workers) < 2 and proc.is_alive() and time.monotonic() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.05)
    while _shards(tmp_path / "out") < 1 and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # the workers have decoded ahead: their chunks wait in the pipe
    assert proc.is_alive() and len(workers) == 2, f"the run ended before it was killed (workers {workers})"
    proc.kill()
    proc.join()
    deadline = time.monotonic() + 10
    while any(_alive(pid, started) for pid, started in workers.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid, started in workers.items() if _alive(pid, started)]
    for pid in left:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, f"decoding workers {left} outlived their SIGKILLed parent by 10 s"
