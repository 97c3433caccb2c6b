"""Fine-tune the demo model on a custom COCO-format dataset, then detect with the result.

Shows the training API: ``regionclip.train.load_train_config`` (a run YAML plus dotted overrides,
the same ``--set key=value`` strings ``regionclip train`` takes), ``regionclip.train.train``, and
loading the finished run with ``RegionCLIP.from_pretrained("OUT/preset.yaml")``.

Your dataset is a COCO instances JSON plus its image folder (``file_name`` relative to it). With
no ``--annotations`` a tiny generated shapes set stands in for it (``regionclip.data.shapes.make_shapes``).
Training starts from the bundled demo weights (``--from-scratch`` starts from random ones) and uses
``configs/train/shapes_demo.yaml`` for everything not overridden. Every category in your file is
trained on unless ``--split`` names base/novel lists (then only base boxes train).

Run (offline; the defaults, 10 steps of 2 images, take 16 s of CPU time):

    python examples/finetune_custom.py --out runs/finetune_demo
    python examples/finetune_custom.py --annotations my/instances_train.json --images my/train \\
        --val-annotations my/instances_val.json --val-images my/val --steps 500 --batch-size 8
    python examples/finetune_custom.py --steps 200 --set optim.lr=3e-4 --set train.train_text_tower=false

Writes to OUT: the run (``config.yaml``, ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``model.pt``,
``preset.yaml``) and ``detections.jpg`` (the fine-tuned model on the first validation image).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import regionclip
from regionclip import RegionCLIP
from regionclip.data.shapes import make_shapes
from regionclip.train import load_train_config, train
from regionclip.visualize import save_annotated

RUN_YAML = Path(__file__).resolve().parent.parent / "configs" / "train" / "shapes_demo.yaml"
DEMO_CHECKPOINT = Path(regionclip.__file__).resolve().parent / "assets" / "demo.pt"  # the demo preset's weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, help="COCO instances JSON to train on (default: generate shapes)")
    parser.add_argument("--images", type=Path, help="folder the training file_name entries are relative to")
    parser.add_argument("--val-annotations", type=Path, help="COCO instances JSON to validate on (optional)")
    parser.add_argument("--val-images", type=Path, help="folder of the validation images")
    parser.add_argument("--split", type=Path, help="base/novel YAML: train on base boxes only, report both")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_custom"), help="run folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, low for trained weights (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=192, help="training images are shrunk to this long side (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=16, help="generated training images, without --annotations (default: %(default)s)")
    parser.add_argument("--num-val", type=int, default=4, help="generated validation images, without --annotations (default: %(default)s)")
    parser.add_argument("--from-scratch", action="store_true", help="start from random weights instead of the demo model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any field of the run YAML, e.g. --set loss.positive_samples=8 (repeatable)")
    args = parser.parse_args(argv)

    if args.annotations is None:  # the stand-in for your data: a small shapes set in COCO format
        data = make_shapes(args.out / "data", n_train=args.num_train, n_val=args.num_val, image_size=(128, 192),
                           overwrite=True)  # same seed, same files: a second run rewrites them
        args.annotations, args.images = data["train_annotations"], data["train_images"]
        args.val_annotations, args.val_images = data["val_annotations"], data["val_images"]
        args.split = args.split or data["split"]
    elif args.images is None:
        parser.error("--annotations needs --images (the folder its file_name entries are relative to)")

    overrides = [
        "stages=[]",  # one box fine-tuning run, not the demo's own two-stage recipe
        f"data.train_annotations={args.annotations}", f"data.train_images={args.images}",
        f"data.val_annotations={args.val_annotations or 'null'}", f"data.val_images={args.val_images or 'null'}",
        f"data.split={args.split or 'null'}", f"data.max_side={args.max_side}",
        f"optim.max_steps={args.steps}", f"optim.batch_size={args.batch_size}", f"optim.lr={args.lr}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        "train.num_workers=0", "train.eval_every=0", f"train.ckpt_every={args.steps}", "train.log_every=1",
    ]
    if not args.from_scratch:  # the demo's weights, its second stage included (it refines the RPN's boxes)
        overrides += [f"model.checkpoint={DEMO_CHECKPOINT}", "model.proposals.source=refined"]
    cfg = load_train_config(RUN_YAML, overrides + args.overrides, out_dir=args.out)

    def progress(event: dict) -> None:
        if "eval" in event:
            ev = dict(event["eval"])
            recall = ev.pop("R50@100", {})  # class-agnostic proposal recall at IoU 0.5, top 100
            short = ev.pop("short_lists", None)  # 3-name lists' mean figures (train.eval_short_lists)
            print(f"step {event['step']}: val AP50 {json.dumps({k: v and round(v, 1) for k, v in ev.items()})}, "
                  f"proposal recall@100 {json.dumps(recall)}" + (f", 3-name lists {json.dumps(short)}" if short else ""))
        elif event["step"] == 1 or event["step"] % 5 == 0 or event["step"] == event["max_steps"]:
            print(f"step {event['step']}/{event['max_steps']}  loss {event['loss']:.3f}  lr {event['lr']:.2e}")

    start = time.perf_counter()
    result = train(cfg, progress=progress)
    print(f"trained {result.step} steps in {time.perf_counter() - start:.1f} s -> {args.out}")

    # The finished run is a preset like any other: `regionclip detect --model OUT/preset.yaml` works too.
    model = RegionCLIP.from_pretrained(str(args.out / "preset.yaml"))
    gt = json.loads(Path(args.val_annotations or args.annotations).read_text())
    names = [c["name"] for c in gt["categories"]]
    first = Path(args.val_images or args.images) / gt["images"][0]["file_name"]
    dets = model.detect(str(first), names)
    picture = save_annotated(args.out / "detections.jpg", str(first), dets)
    print(f"{first.name}: " + (", ".join(f"{n} {s:.2f}" for n, s in zip(dets.names, dets.scores.tolist())) or "nothing"))
    print(f"annotated: {picture}")
    return {"out": args.out, "losses": result.losses, "evals": result.evals, "detections": len(dets), "picture": picture}


if __name__ == "__main__":
    main()
