"""Evaluate a model with a base/novel split: COCO AP50 overall, on base and on novel categories.

Shows ``regionclip.evaluate.load_ground_truth`` (COCO instances JSON), ``regionclip.data.splits.load_split``
(a YAML with ``base:`` and ``novel:`` lists) and ``regionclip.eval_dataset.evaluate_model``, which runs
the model over every image and scores it with pycocotools. This is the generalized open-vocabulary
setting: every box is labelled from the whole vocabulary (base and novel names together), and the
base/novel figures average over their own categories only.

Run (offline, demo model; 8 s of CPU time with the default 8 generated images):

    python examples/evaluate_split.py                      # generates a shapes val set in OUT/data
    python examples/evaluate_split.py --num-images 200     # the shapes val set of docs/demo-model.md (seed 0, 200 images)
    python examples/evaluate_split.py --annotations instances_val2017.json --images val2017/ \\
        --split configs/splits/ovd_coco.yaml --model rn50

Writes ``OUT/report.json`` (every figure, per category too).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from regionclip import RegionCLIP
from regionclip.data.shapes import make_shapes
from regionclip.data.splits import load_split
from regionclip.eval_dataset import evaluate_model
from regionclip.evaluate import load_ground_truth, write_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, help="COCO instances JSON (default: generate shapes val)")
    parser.add_argument("--images", type=Path, help="folder the file_name entries are relative to")
    parser.add_argument("--split", type=Path, help="base/novel YAML (default with generated data: its split.yaml)")
    parser.add_argument("--model", default="demo", help="preset name or preset YAML (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="labels each box contributes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--num-images", type=int, default=8, help="generated val images, without --annotations (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("eval_split"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.annotations is None:
        data = make_shapes(args.out / "data", n_train=0, n_val=args.num_images, seed=0, image_size=(192, 320),
                           overwrite=True)  # same seed, same files: a second run rewrites them
        args.annotations, args.images = data["val_annotations"], data["val_images"]
        args.split = args.split or data["split"]
    elif args.images is None or args.split is None:
        parser.error("--annotations needs --images and --split")

    coco = load_ground_truth(args.annotations)
    split = load_split(args.split)
    model = RegionCLIP.from_pretrained(args.model)
    report, _records = evaluate_model(model, coco, args.images, split=split, top_k=args.top_k, batch_size=args.batch_size)

    ap = report["map"]
    print(f"{report['settings']['images']} images, vocabulary of {report['settings']['vocabulary_size']} names, "
          f"top {args.top_k} labels per box")
    for part in ("overall", "base", "novel"):
        value = ap.get(part, {}).get("AP50")
        count = len(coco.cats) if part == "overall" else len(split[part])
        print(f"  AP50 {part:>7} ({count:2d} categories): " + ("n/a (no boxes)" if value is None else f"{value:5.1f}"))
    write_report(report, args.out / "report.json")
    return {part: ap.get(part, {}).get("AP50") for part in ("overall", "base", "novel")} | {"report": args.out / "report.json"}


if __name__ == "__main__":
    main()
