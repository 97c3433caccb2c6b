"""The labelling loop measured end to end on generated data (issue 33): label, review the most
doubtful images, fine-tune on them, and what that costs the starting model's own names.

    python benchmarks/bench_loop.py --work runs/bench_loop [--train 500] [--val 200] [--review 50]
        [--seeds 0,1] [--selections doubt,random] [--arms retained,wise+distill] [--steps 30]
        [--alphas 0.7] [--set retention.replay_count=100 --tag _r100] [--json F]

1. Data: ``make-shapes --style alt`` (seed 7) is the user's new domain, its 12 names new to the
   demo model; ``make-shapes`` val (seed 0, 200 images) holds the demo's own 12 names.
2. Before: the demo model on both val sets (one label per box, each set's names only:
   ``regionclip eval --top-k 1 --distractors none``).
3. Round 0: ``label`` over the ``--train`` alt images with the alt names (the demo's own
   distractors would claim every box: ``--distractors none``).
4. Review: the ``--review`` most doubtful images (``regionclip.doubt.most_doubtful``) have their
   ground truth stand in for people's corrections; the control takes as many at random (per seed).
5. Fine-tune on them with ``configs/train/finetune.yaml`` (its 120 steps of 8 images, or ``--steps``;
   seeded), one run per arm. Every run's replay images are ``--replay-pool`` ``make-shapes`` train
   images (seed 1: the demo's world, not the held-out val set) labelled by the demo. ``retained``
   is the recipe as shipped (replay, no WiSE-FT); ``plain`` trains without replay, WiSE-FT or
   distillation; ``wise`` is the recipe before replay (WiSE-FT 0.5, no replay; measured at
   ``--steps 30``; its report also scores the weights before mixing); ``replay`` turns replay on
   again after an arm that turned it off; ``frozen_text`` freezes the text tower; ``distill`` adds
   distillation of the demo's names. ``a+b`` runs both changes; ``--set KEY=VALUE`` changes every
   run (``--tag`` names them apart; a given ``--steps`` is in the name already).
   Each run's ``retention.json`` gives the after figures; its "before" is step 2's, written there
   first so that each run does not measure the same start again.

``--alphas`` scores more WiSE-FT mixes of each run's fine-tuned weights (``last.pt``) with the
demo's. Everything lands under ``--work``; a second call reuses data, labels and finished runs. Prints a
table; ``--json`` writes the figures and settings.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "train" / "finetune.yaml"

# What each arm changes in the recipe ("a+b" runs both changes). Every run replays the bench's own
# replay images ({replay}), not the recipe's path. The report scores the fine-tuned weights before
# WiSE-FT mixes them, so an arm with wise_alpha < 1 also gives the same training unmixed.
ARMS = {
    "retained": [],  # the recipe as shipped: replay, no WiSE-FT
    "plain": ["retention.wise_alpha=1.0", "retention.distill_weight=0", "retention.replay_images=null"],
    "wise": ["retention.wise_alpha=0.5", "retention.replay_images=null"],  # the recipe before replay (30 steps)
    "replay": ["retention.replay_images={replay}"],
    "frozen_text": ["train.train_text_tower=false"],
    "distill": ["retention.distill_weight=1.0"],
}


def arm_overrides(arm: str, replay: Path) -> list[str]:
    return [o.format(replay=replay) for part in arm.split("+") for o in ARMS[part]]


def make_data(work: Path, n_train: int, n_val: int, n_replay: int) -> dict[str, dict[str, Path]]:
    from regionclip.data.shapes import make_shapes

    sets = {}
    for name, style, seed, train, val in (("shapes", "shapes", 0, 0, n_val), ("alt", "alt", 7, n_train, n_val),
                                          ("replay", "shapes", 1, n_replay, 1)):
        folder = work / "data" / name
        done = folder / "annotations" / "instances_val.json"
        if not done.is_file():
            make_shapes(folder, n_train=train, n_val=val, seed=seed, image_size=(192, 320), style=style,
                        overwrite=True)
        sets[name] = {"train_annotations": folder / "annotations" / "instances_train.json",
                      "train_images": folder / "train", "val_annotations": done, "val_images": folder / "val",
                      "split": folder / "split.yaml"}
    return sets


def measure_start(work: Path, sets: dict) -> dict:
    """The demo's AP50 on both val sets, as the retention report scores them."""
    path = work / "before.json"
    if path.is_file():
        return json.loads(path.read_text())
    from regionclip import RegionCLIP

    figures = score_both(RegionCLIP.from_pretrained("demo"), sets)
    path.write_text(json.dumps(figures, indent=2))
    return figures


def score_both(model, sets: dict) -> dict:
    """AP of ``model`` on the held-out shapes val (its base / novel split) and the new alt val, one
    label per box, without distractors (the demo's own names would take every alt box)."""
    from regionclip.data import CocoDetection, load_split
    from regionclip.train import evaluate

    figures = {}
    for key, name, split in (("held_out", "shapes", True), ("new", "alt", False)):
        s = sets[name]
        ap = evaluate(model, CocoDetection(s["val_annotations"], s["val_images"]),
                      load_split(s["split"]) if split else None, top_k=1, distractors="none")
        figures[key] = {k: v for k, v in ap.items() if k in ("overall", "base", "novel")}
    return figures


def round_zero(work: Path, alt: dict) -> Path:
    """``regionclip label`` over the alt training images with the alt names and the demo model."""
    from regionclip import RegionCLIP
    from regionclip.label import label_images, model_identity
    from regionclip.label.run import scoring_identity
    from regionclip.vocabulary import Vocabulary

    names = [c["name"] for c in json.loads(Path(alt["train_annotations"]).read_text())["categories"]]
    out = work / "round0"
    model = None

    def build():
        nonlocal model
        model = RegionCLIP.from_pretrained("demo")
        return model

    from regionclip.model import resolve_model_config

    cfg = resolve_model_config("demo")
    identity = {"model": model_identity(cfg, "demo"), "scoring": scoring_identity(cfg, {})}
    vocab = Vocabulary.from_labels(names).with_distractors("none")
    label_images([str(alt["train_images"])], vocab, build, out, identity=identity, num_workers=1)
    return out


def orders(round0: Path, alt: dict, seed: int) -> dict[str, list[str]]:
    """File names most doubtful first, and a seeded random order."""
    from regionclip.doubt import most_doubtful

    doubt = [Path(image).name for image, _ in most_doubtful(round0)]
    names = sorted(i["file_name"] for i in json.loads(Path(alt["train_annotations"]).read_text())["images"])
    random.Random(seed).shuffle(names)
    return {"doubt": doubt, "random": names}


def subset(annotations: Path, names: list[str], out: Path) -> Path:
    """``annotations`` with only the images ``names`` (and their boxes): the reviewed images."""
    data = json.loads(Path(annotations).read_text())
    keep = set(names)
    images = [i for i in data["images"] if i["file_name"] in keep]
    ids = {i["id"] for i in images}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**data, "images": images,
                               "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return out


def fine_tune(out: Path, train_json: Path, sets: dict, before: dict, seed: int, steps: int | None, arm: str,
              extra: list[str]) -> dict:
    from regionclip.train import load_train_config, train

    report = out / "retention.json"
    if report.is_file() and "after" in json.loads(report.read_text()):
        return json.loads(report.read_text())
    alt, shapes = sets["alt"], sets["shapes"]
    overrides = [f"data.train_annotations={train_json}", f"data.train_images={alt['train_images']}",
                 f"data.val_annotations={alt['val_annotations']}", f"data.val_images={alt['val_images']}",
                 f"retention.annotations={shapes['val_annotations']}", f"retention.images={shapes['val_images']}",
                 f"retention.split={shapes['split']}", f"train.seed={seed}",
                 *([f"optim.max_steps={steps}", f"train.ckpt_every={steps}"] if steps is not None else []),
                 f"retention.replay_images={sets['replay']['train_images']}",
                 *arm_overrides(arm, sets["replay"]["train_images"]), *extra]
    cfg = load_train_config(RECIPE, overrides, out_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"before": before}))  # measured once, in measure_start
    start = time.perf_counter()
    result = train(cfg)
    figures = dict(result.retention)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    report.write_text(json.dumps(figures, indent=2))
    return figures


def other_alphas(out: Path, sets: dict, alphas: list[float]) -> dict[str, dict]:
    """The run's fine-tuned weights (``last.pt``) mixed with the demo's at each of ``alphas``,
    scored as the report scores them; cached in ``OUT/alphas.json``."""
    from regionclip import RegionCLIP
    from regionclip.train.retention import interpolate
    from regionclip.train.state import load_checkpoint

    path = out / "alphas.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for alpha in alphas:
        if str(alpha) in done:
            continue
        model = RegionCLIP.from_pretrained("demo")
        start = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(load_checkpoint(out / "last.pt")["model"])
        interpolate(model, start, alpha)
        done[str(alpha)] = score_both(model, sets)
        path.write_text(json.dumps(done, indent=2))
    return {a: done[a] for a in map(str, alphas)}


def row(name: str, figures: dict) -> str:
    new, held = figures.get("new", {}), figures.get("held_out", {})
    cells = [new.get("overall"), held.get("base"), held.get("novel")]
    return f"| {name} | " + " | ".join("" if v is None else f"{v:.1f}" for v in cells) + " |"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_loop"), help="folder for everything")
    parser.add_argument("--train", type=int, default=500, help="alt training images labelled in round 0")
    parser.add_argument("--val", type=int, default=200, help="val images of each set")
    parser.add_argument("--review", type=int, default=50, help="images whose ground truth is the correction")
    parser.add_argument("--seeds", default="0,1", help="fine-tune seeds (and the random control's draw)")
    parser.add_argument("--selections", default="doubt,random", help="doubt, random")
    parser.add_argument("--arms", default="retained", help=f"of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of 8 images (default: the recipe's)")
    parser.add_argument("--alphas", default="", help="more WiSE-FT mixes of each run's fine-tuned weights to "
                        "score, e.g. 0.7,0.85 (two evaluations each)")
    parser.add_argument("--replay-pool", type=int, default=200, help="make-shapes train images (seed 1) the "
                        "replay arm draws from: the demo's world, not the held-out val set")
    parser.add_argument("--set", action="append", default=[], help="another recipe override for every run "
                        "(KEY=VALUE, repeatable); name the runs apart with --tag")
    parser.add_argument("--tag", default="", help="appended to the run folders' names")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]

    start = time.perf_counter()
    sets = make_data(args.work, args.train, args.val, args.replay_pool)
    before = measure_start(args.work, sets)
    round0 = round_zero(args.work, sets["alt"])
    runs = []
    print("| run | alt val AP50 | shapes val AP50 base | novel |\n|---|---|---|---|")
    print(row("demo (before)", before))
    for seed in (int(s) for s in args.seeds.split(",")):
        picked = orders(round0, sets["alt"], seed)
        for selection in args.selections.split(","):
            train_json = subset(sets["alt"]["train_annotations"], picked[selection][:args.review],
                                args.work / "reviewed" / f"{selection}_s{seed}.json")
            for arm in args.arms.split(","):
                name = f"{arm}_{selection}_s{seed}" + (f"_{args.steps}steps" if args.steps is not None else "") + args.tag
                figures = fine_tune(args.work / "runs" / name, train_json, sets, before, seed, args.steps, arm, args.set)
                runs.append({"arm": arm, "selection": selection, "seed": seed, "steps": args.steps, "tag": args.tag,
                             **figures})
                if "fine_tuned" in figures:
                    print(row(f"{name}, before WiSE-FT mixing", figures["fine_tuned"]))
                print(row(f"{name}, WiSE-FT {figures.get('wise_alpha')}", figures["after"]), flush=True)
                for alpha, mixed in other_alphas(args.work / "runs" / name, sets, args.alphas).items():
                    runs[-1].setdefault("alphas", {})[alpha] = mixed
                    print(row(f"{name}, WiSE-FT {alpha}", mixed), flush=True)
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "before": before, "runs": runs, "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
