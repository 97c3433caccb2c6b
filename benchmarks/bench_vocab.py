"""Vocabulary benchmarks: compile time of exemplar vs text labels, and calibrated thresholds on a
second set.

    python benchmarks/bench_vocab.py compile --model demo --n 1000 \
        --annotations data/shapes/annotations/instances_train.json --images data/shapes/train
    python benchmarks/bench_vocab.py check --model demo --vocab tuned.yaml \
        --annotations data/shapes_s3/annotations/instances_val.json --images data/shapes_s3/val

``compile``: N classes of one exemplar each (the first N training GT boxes, so several per
image, as a labelled set gives them) against N text labels, each on a fresh backend with no
cache; prints both times and their ratio. ``check``: each class's precision and recall on another
set as the real pipeline gives them with the tuned file (``detect --vocab tuned.yaml``: its
thresholds, then the model's NMS and ``max_detections``), beside what the file expected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def bench_compile(a) -> None:
    from regionclip import RegionCLIP
    from regionclip.backend import TorchBackend
    from regionclip.predictor import Predictor
    from regionclip.vocabulary import Exemplar, VocabClass, Vocabulary

    coco = json.loads(a.annotations.read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    anns = sorted((x for x in coco["annotations"] if x["bbox"][2] > 1 and x["bbox"][3] > 1), key=lambda x: x["id"])
    if len(anns) < a.n:
        raise SystemExit(f"{a.annotations} has {len(anns)} boxes, fewer than --n {a.n}")
    exemplar_vocab = Vocabulary(tuple(
        VocabClass(f"exemplar {i}", exemplars=(Exemplar(a.images / files[x["image_id"]],
                                                        (x["bbox"][0], x["bbox"][1], x["bbox"][0] + x["bbox"][2],
                                                         x["bbox"][1] + x["bbox"][3])),))
        for i, x in enumerate(anns[:a.n])))
    text_vocab = Vocabulary.from_labels([f"a thing numbered {i}" for i in range(a.n)])
    model = RegionCLIP.from_pretrained(a.model)
    Predictor(TorchBackend(model)).compile(Vocabulary.from_labels(["warm up"]))  # first-call costs out of both
    times = {}
    for name, vocab in (("text", text_vocab), ("exemplars", exemplar_vocab)):
        model.text._memory.clear()  # nothing cached: every prompt and exemplar is embedded
        start = time.perf_counter()
        Predictor(TorchBackend(model)).compile(vocab)
        times[name] = time.perf_counter() - start
    print(f"compile {a.n} labels on {model.device} ({a.model}): text {times['text']:.2f} s, one exemplar each "
          f"{times['exemplars']:.2f} s ({len({e.image for c in exemplar_vocab.classes for e in c.exemplars})} "
          f"images); ratio exemplars/text {times['exemplars'] / times['text']:.2f}")


def bench_check(a) -> None:
    import yaml

    from regionclip import RegionCLIP
    from regionclip.calibrate import check
    from regionclip.evaluate import load_ground_truth
    from regionclip.vocabulary import Vocabulary

    data = yaml.safe_load(a.vocab.read_text())
    vocab = Vocabulary.from_yaml(a.vocab)
    model = RegionCLIP.from_pretrained(a.model)
    got = check(model.predictor, load_ground_truth(a.annotations), a.images, vocab)
    print(f"target {data.get('target')}; fitted on {data.get('calibrated_on', {}).get('annotations')}; "
          f"checked on {a.annotations}")
    print(f"{'class':18s} {'thr':>6s} {'P expected':>10s} {'P here':>7s} {'diff':>6s} {'R expected':>10s} {'R here':>7s}")
    tp = kept = 0
    for f in got:
        e = data.get("expected", {}).get(f.name, {})
        pe, p = e.get("precision"), f.precision
        diff = f"{100 * (p - pe):+.1f}" if pe is not None and p is not None else "-"
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        print(f"{f.name:18s} {f.threshold if f.threshold is not None else '-':>6} {fmt(pe):>10s} {fmt(p):>7s} "
              f"{diff:>6s} {fmt(e.get('recall')):>10s} {fmt(f.recall):>7s}")
        kept += f.detections
        tp += round((f.precision or 0) * f.detections)
    print(f"all classes pooled: precision {100 * tp / max(kept, 1):.1f} ({kept} detections)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", default="demo")
    c.add_argument("--n", type=int, default=1000)
    c.add_argument("--annotations", type=Path, required=True)
    c.add_argument("--images", type=Path, required=True)
    k = sub.add_parser("check")
    k.add_argument("--model", default="demo")
    k.add_argument("--vocab", type=Path, required=True)
    k.add_argument("--annotations", type=Path, required=True)
    k.add_argument("--images", type=Path, required=True)
    a = ap.parse_args()
    bench_compile(a) if a.cmd == "compile" else bench_check(a)


if __name__ == "__main__":
    main()
