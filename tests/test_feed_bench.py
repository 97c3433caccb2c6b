"""The loading benchmark runs end to end at toy sizes (two of its three runs, to keep the suite
short; the figures come from a full run: this only keeps the script working)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

from conftest import shrink_before_fork

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loading.py"


@pytest.mark.slow
def test_bench_loading_reports_ratios(tmp_path, capsys, monkeypatch):
    # The script's scratch folder (its data set and 110 MB checkpoints) goes where tmp_path is.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shrink_before_fork()  # its loader forks a worker
    spec = importlib.util.spec_from_file_location("bench_loading", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--steps", "2", "--warmup", "0", "--images", "4", "--batch-size", "2", "--max-side", "64",
                      "--workers", "1", "--repeats", "1", "--runs", "model,workers", "--json", str(tmp_path / "r.json")])
    assert out["ratio_workers_1"] > 0 and out["runs_s_per_step"].keys() == {"model", "workers"}
    assert (tmp_path / "r.json").is_file() and "model only" in capsys.readouterr().out
