"""Text-tower speed: full 77-token contexts against short contexts, in one run.

Random weights, offline, CPU by default. Compares, on the same model and prompts:

* ``full 77 tokens``: every prompt through ``clip.encode_text`` at the full context (the old
  path, ``TextEncoder(short_context=False)``);
* ``short``: ``TextEncoder`` as ``RegionCLIP`` builds it (batches by template and length, each
  cut to its longest prompt, the template's prefix shared);
* ``cut only, no prefix``: batches sorted by length and cut, nothing shared (what the cut alone
  gives);

checks that both give the same embeddings, then encodes an LVIS-sized vocabulary end to end
(tokenising, batching, caching) through ``TextEncoder``. The full path on 1000 labels takes many
minutes on 2 cores, so by default it runs on a subset and its per-prompt rate is reported.

    python benchmarks/bench_text.py --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time

import open_clip
import torch

from regionclip.config import DEFAULT_TEMPLATES
from regionclip.text import TextEncoder, context_lengths, encode_text_truncated

NOUNS = """chair table lamp sofa bed pillow blanket curtain mirror clock vase bowl plate cup mug
glass bottle jar kettle toaster microwave oven refrigerator sink faucet towel soap toothbrush
umbrella backpack handbag suitcase wallet hat cap helmet scarf glove boot sneaker sandal jacket
shirt dress skirt belt necklace bracelet watch ring earring camera phone laptop keyboard mouse
monitor television remote speaker headphones guitar piano violin drum trumpet book notebook pencil
pen scissors stapler envelope basket box crate barrel bucket shovel hammer wrench screwdriver
ladder bicycle motorcycle car truck bus train boat airplane helicopter tractor skateboard surfboard
kite frisbee ball racket bat bench fence gate mailbox hydrant sign lantern candle flag banner tent
cart wagon trailer bridge fountain statue apple banana orange lemon carrot broccoli tomato potato
onion pepper cucumber pumpkin watermelon strawberry grape cake cookie donut pizza sandwich burger
dog cat horse cow sheep goat pig chicken duck goose bird owl parrot eagle rabbit squirrel deer
bear elephant giraffe zebra lion tiger monkey fish turtle frog snake butterfly bee""".split()
ADJECTIVES = """red blue green yellow black white wooden metal plastic glass leather paper striped
folding electric toy baby wild frozen dried paper-mache stuffed antique broken""".split()


def vocabulary(n: int) -> list[str]:
    """``n`` distinct LVIS-like object names (deterministic): every single noun, one sixth
    three-word names, the rest adjective + noun, shuffled so any prefix mixes the lengths."""
    rng = random.Random(0)
    two = [f"{a} {b}" for a, b in itertools.product(ADJECTIVES, NOUNS)]
    three = [f"{a} {b} {c}" for a, b, c in itertools.product(ADJECTIVES[:6], ADJECTIVES[6:12], NOUNS)]
    singles = NOUNS[:n]
    n_three = min(n // 6, n - len(singles))
    n_two = n - len(singles) - n_three
    if n_two > len(two):
        raise SystemExit(f"at most {len(NOUNS) + len(two) + n // 6} labels")
    names = singles + rng.sample(two, n_two) + rng.sample(three, n_three)
    rng.shuffle(names)
    return names


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cut_only(clip, tokenizer, templates, labels, chunk_size, device) -> torch.Tensor:
    """Short contexts without the shared prefix: prompts sorted by length, batches cut to their
    longest prompt (shows what each half of the speed-up gives)."""
    tokens = tokenizer([t.format(lb) for lb in labels for t in templates])
    order = torch.argsort(context_lengths(clip, tokens), stable=True)
    with torch.inference_mode():
        feats = [encode_text_truncated(clip, tokens[idx].to(device), share_prefix=False)
                 for idx in order.split(chunk_size)]
    return torch.cat(feats)[torch.argsort(order)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    ap.add_argument("--labels", type=int, default=1000, help="vocabulary compared full vs short")
    ap.add_argument("--full-labels", type=int, default=100,
                    help="labels the full path runs on (a subset of --labels; its rate is scaled up)")
    ap.add_argument("--lvis-labels", type=int, default=1203, help="vocabulary encoded end to end (0 skips)")
    ap.add_argument("--chunk-size", type=int, default=512, help="prompts per text-tower batch")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    clip = open_clip.create_model(args.model, pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    templates = DEFAULT_TEMPLATES
    labels = vocabulary(max(args.labels, args.lvis_labels))

    def encoder(short: bool) -> TextEncoder:
        return TextEncoder(clip.encode_text, tokenizer, templates, model_key=args.model, device=device,
                           chunk_size=args.chunk_size, short_context=short)

    def run(short: bool, n: int) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            out, seconds = timed(lambda: encoder(short).embed(labels[:n]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, seconds

    n_full = min(args.full_labels, args.labels)
    rows = []  # (path, labels, prompts, seconds, scaled)
    full, t_full = run(False, n_full)
    rows.append(("full 77 tokens", n_full, t_full))
    short_sub, t_short_sub = run(True, n_full)
    rows.append(("short", n_full, t_short_sub))
    diff = (full - short_sub).abs().max().item()
    _, t_cut = timed(lambda: cut_only(clip, tokenizer, templates, labels[:n_full], args.chunk_size, device))
    rows.append(("cut only, no prefix", n_full, t_cut))
    short, t_short = run(True, args.labels)
    rows.append(("short", args.labels, t_short))
    if args.lvis_labels:
        enc = encoder(True)
        with torch.inference_mode():
            _, t_lvis = timed(lambda: enc(labels[:args.lvis_labels]))  # tokenise + encode + cache
        rows.append(("short, end to end", args.lvis_labels, t_lvis))

    per_prompt_full = t_full / (n_full * len(templates))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{args.model}, random weights, {len(templates)} templates, device {args.device}, "
          f"{args.threads} threads, chunk {args.chunk_size}, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'path':<20}{'labels':>7}{'prompts':>9}{'seconds':>10}{'ms/prompt':>11}{'speed-up':>10}")
    for path, n, seconds in rows:
        prompts = n * len(templates)
        rate = seconds / prompts
        print(f"{path:<20}{n:>7}{prompts:>9}{seconds:>10.1f}{rate * 1e3:>11.2f}{per_prompt_full / rate:>9.1f}x")
    tokens = tokenizer([t.format(lb) for lb in labels[:args.labels] for t in templates])
    print(f"mean prompt length {(tokens != 0).sum(1).float().mean():.1f} tokens incl. start/end "
          f"(max {(tokens != 0).sum(1).max()})")
    print(f"max |full - short| over {n_full} label embeddings (unit norm): {diff:.1e}")
    if n_full < args.labels:
        print(f"full path for {args.labels} labels, from its per-prompt rate: "
              f"{per_prompt_full * args.labels * len(templates):.0f} s (speed-up column = full rate / row rate)")


if __name__ == "__main__":
    main()
