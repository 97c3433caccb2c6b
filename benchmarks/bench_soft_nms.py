"""Soft-NMS at RegionCLIP's COCO settings: 1000 proposals x 65 labels scored at threshold 0.001
(``regionclip-rn50-coco``), 100 detections kept. Times ``select_pairs`` with the picks stopped at
``max_detections`` against the full sequential run, and checks that both keep the same boxes.

    python benchmarks/bench_soft_nms.py [--proposals 1000] [--labels 65] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from regionclip.config import ScoringConfig
from regionclip.scoring import batched_soft_nms, select_pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposals", type=int, default=1000)
    parser.add_argument("--labels", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(args.proposals, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 20 + torch.rand(args.proposals, 2, generator=g) * 200], 1)
    probs = torch.rand(args.proposals, args.labels, generator=g).softmax(dim=1)  # most pairs above 0.001
    cfg = ScoringConfig(score_threshold=0.001, soft_nms=True, recipe="regionclip", background=True, max_detections=100)
    names = [f"label {i}" for i in range(args.labels)]

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    fast_s, fast = timed(lambda: select_pairs(boxes, probs, cfg, names))
    rows, labels = torch.nonzero(probs > cfg.score_threshold, as_tuple=True)
    pairs = boxes[rows], probs[rows, labels]
    full_s, (keep, _) = timed(lambda: batched_soft_nms(*pairs, labels))
    same = torch.equal(fast.label_ids, labels[keep[:100]]) and torch.equal(fast.boxes_xyxy, pairs[0][keep[:100]])
    result = {"pairs": len(rows), "stopped_s": round(fast_s, 3), "full_s": round(full_s, 3),
              "speed-up": round(full_s / fast_s, 1), "identical": same}
    print(result)
    return result


if __name__ == "__main__":
    main()
