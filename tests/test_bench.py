"""``regionclip.bench`` and ``regionclip bench`` on tiny random models (shape of the result, never speed)."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import TINY_DETECTOR, tiny_model
from test_cli import TINY, run

from regionclip import RegionCLIP
from regionclip.bench import STAGES, parse_size, run_benchmark
from regionclip.errors import BadInput

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

KEYS = {"settings", "device", "device_name", "torch", "images_per_s", "batch_ms", "stages_ms",
        "text_encode_ms", "text_prompts_encoded", "boxes_per_image", "gflop_per_image",
        "achieved_tflops", "peak_memory_mb", "memory_kind"}


def check_result(r: dict, batch_size: int, num_labels: int) -> None:
    assert KEYS <= set(r)
    assert r["settings"]["batch_size"] == batch_size and r["settings"]["num_labels"] == num_labels
    assert r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and r["achieved_tflops"] > 0
    assert r["boxes_per_image"] > 0 and r["peak_memory_mb"] >= 0 and r["memory_kind"]
    assert r["text_encode_ms"] > 0
    assert set(r["stages_ms"]) == set(STAGES)
    for q in [r["batch_ms"], *r["stages_ms"].values()]:
        assert set(q) == {"median", "p10", "p90"}
        assert 0 < q["p10"] <= q["median"] <= q["p90"]


@pytest.mark.parametrize("arch,mode", [("vit", "crop"), ("rn", "pool"), ("vit", "pool")])
def test_run_benchmark_reports_every_measure(arch, mode):
    calls = []
    model = tiny_model(arch, mode)
    r = run_benchmark(model, batch_size=2, image_size=(64, 96), num_labels=3, iters=2, warmup=1,
                      progress=lambda done, total: calls.append((done, total)))
    check_result(r, batch_size=2, num_labels=3)
    assert r["device"] == "cpu" and r["settings"]["mode"] == mode
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert r["text_prompts_encoded"] == 3 * len(model.cfg.text.templates)
    json.dumps(r)  # JSON-ready as it stands


def test_cached_labels_are_not_encoded_again(models):
    model = models("vit", "crop")
    run_benchmark(model, image_size=(64, 64), num_labels=2, iters=1, warmup=0)
    r = run_benchmark(model, image_size=(64, 64), num_labels=2, iters=1, warmup=0)
    assert r["text_prompts_encoded"] == 0
    assert r["gflop_per_image"] > 0  # counted on an extra pass when there is no warm-up


def test_bench_times_the_models_own_stages(monkeypatch):
    model = tiny_model("vit", "crop")
    calls = {"propose": 0, "postprocess": 0}
    backend = model.predictor.backend  # what detect runs: the model's stages, the backend's postprocess
    propose, postprocess = model.propose, backend.postprocess

    def three_boxes(batch):
        calls["propose"] += 1
        boxes, objectness = propose(batch)
        return [b[:3] for b in boxes], [o[:3] for o in objectness]

    def counted(*args, **kwargs):
        calls["postprocess"] += 1
        return postprocess(*args, **kwargs)

    monkeypatch.setattr(model, "propose", three_boxes)
    monkeypatch.setattr(backend, "postprocess", counted)
    r = run_benchmark(model, batch_size=2, image_size=(64, 96), num_labels=2, iters=2, warmup=1)
    assert r["boxes_per_image"] == 3  # the figures follow what the model's stage returns
    assert calls == {"propose": 3, "postprocess": 3}


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(num_labels=0), dict(iters=0),
                                    dict(warmup=-1), dict(image_size=(8, 64))])
def test_bad_settings_raise_bad_input(models, kwargs):
    with pytest.raises(BadInput):
        run_benchmark(models("vit", "crop"), **{"image_size": (64, 64), "iters": 1, "warmup": 0, **kwargs})


def test_parse_size():
    assert parse_size("640x853") == (640, 853)
    assert parse_size(" 480 X 640 ") == (480, 640)
    for bad in ["640", "640x", "axb", "16x16", "1x2x3"]:
        with pytest.raises(BadInput):
            parse_size(bad)


def test_cli_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "bench" / "r.json"
    code, out, err = run(["bench", *TINY, "--image-size", "64x96", "--labels", "4", "--proposals", "20",
                          "--iters", "2", "--warmup", "1", "--batch-size", "2", "--json", str(out_json)], capsys)
    assert code == 0, err
    assert "images/s" in out and "GFLOP / image" in out
    r = json.loads(out_json.read_text())
    check_result(r, batch_size=2, num_labels=4)
    assert r["settings"]["num_proposals"] == 20 and r["settings"]["image_size"] == [64, 96]


@pytest.mark.parametrize("flags,message", [
    (["--image-size", "640"], "HEIGHTxWIDTH"),
    (["--batch-size", "0"], "batch size"),
    (["--proposals", "0"], "number of proposals"),
    (["--labels", "0"], "number of labels"),
])
def test_cli_bench_bad_flags_give_one_line(capsys, flags, message):
    code, out, err = run(["bench", *TINY, *flags], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_benchmark_on_gpu_reports_cuda_memory():
    torch.manual_seed(0)
    model = RegionCLIP(clip_model="test-vit-tiny", clip_pretrained="none", detector=TINY_DETECTOR,
                       detector_weights="none", mode="crop", device="cuda", precision="bf16")
    r = run_benchmark(model, batch_size=2, image_size=(64, 96), num_labels=3, iters=2, warmup=1)
    check_result(r, batch_size=2, num_labels=3)
    assert r["device"].startswith("cuda") and "max_memory_allocated" in r["memory_kind"]
    assert r["peak_memory_mb"] > 0


def test_bench_soft_nms_script_keeps_the_same_detections():
    """``benchmarks/bench_soft_nms.py`` (the measurement behind docs/benchmarks.md) still runs and agrees."""
    main = runpy.run_path(str(BENCHMARKS / "bench_soft_nms.py"))["main"]
    result = main(["--proposals", "60", "--labels", "5", "--repeats", "1"])
    assert result["identical"] and result["pairs"] == 300, result


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_scripts_show_their_help(script, monkeypatch, capsys):
    """Every measurement script parses its arguments and names itself by its new path."""
    import sys

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "examples/" not in (BENCHMARKS / script).read_text(), "the scripts moved to benchmarks/"
