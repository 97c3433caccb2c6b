"""Images/s of regionclip next to its peers, in one run on one device, with random weights.

Rows: regionclip ViT-B/16 in pool and crop mode and the ``fast`` preset
(``regionclip.bench.run_benchmark``); the naive pipeline (RPN top-N boxes, each cut out and
resized to 224 on its own in a Python loop, then the stack through CLIP ViT-B/16); OWL-ViT B/16,
OWL-ViT B/32 and OWLv2 B/16 from ``transformers`` built from their configs (no downloads;
skipped with a note when transformers is missing: ``pip install -e '.[peers]' in the checkout``).

Every system gets the same synthetic images, the same number of labels with text embedded
once before timing, the same warm-up and the same precision (autocast, as regionclip runs).
The defaults suit a GPU; on a CPU shrink them, e.g.

    python benchmarks/bench_peers.py --device cpu --precision fp32 --batch-size 1 \\
        --image-size 480x640 --proposals 100 --iters 2 --warmup 1

Prints a markdown table (system | img/s | settings) headed by the device's name.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from regionclip import RegionCLIP
from regionclip.batch import ImageBatch
from regionclip.bench import device_name, parse_size, run_benchmark, synthetic_images, synthetic_labels
from regionclip.runtime import autocast_for, resolve_device, synchronize
from regionclip.scoring import score_regions


def time_images_per_s(fn, batch_size: int, device: torch.device, iters: int, warmup: int) -> float:
    """Median images/s of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def naive_pipeline(model: RegionCLIP, images, labels):
    """RPN top-N -> cut out each box at integer pixels -> resize to 224 -> CLIP ViT-B/16 -> scores + NMS."""
    text_emb = model.text(labels)  # cached after the first call, as in regionclip
    regions = model.regions  # borrowed only for its normalisation and input size
    size = regions.input_size
    out = []
    for img, boxes, objectness in zip(images, *model.propose(ImageBatch.from_tensors(images))):
        crops = []
        for x1, y1, x2, y2 in boxes.round().int().tolist():  # one crop at a time, as a PIL loop would
            patch = img[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
            patch = F.interpolate(patch[None], size=(size, size), mode="bilinear", align_corners=False)
            crops.append(regions.normalize(patch[0]))
        emb = F.normalize(model.clip.encode_image(torch.stack(crops)).float(), dim=-1)
        out.append(score_regions(emb, text_emb, boxes, objectness, model.cfg.scoring,
                                 model.logit_scale, labels))
    return out


def owl_peer(version: int, device, batch_size: int, num_labels: int, patch: int = 16):
    """A random OWL-ViT B/``patch`` (768 px) or OWLv2 B/16 (960 px) and a step function, or None without transformers."""
    try:
        import transformers as T
    except ImportError:
        return None
    if version == 1:
        size = 768
        model = T.OwlViTForObjectDetection(T.OwlViTConfig(vision_config={"patch_size": patch, "image_size": size}))
    else:
        size = 960
        model = T.Owlv2ForObjectDetection(T.Owlv2Config(vision_config={"patch_size": patch, "image_size": size}))
    model.eval().to(device)
    base = model.owlvit if version == 1 else model.owlv2
    with torch.inference_mode():
        # Queries embedded once, as regionclip caches its label embeddings.
        ids = torch.randint(1, 1000, (num_labels, 16), device=device)
        out = base.get_text_features(input_ids=ids)
        text = out if isinstance(out, torch.Tensor) else out.pooler_output
        queries = F.normalize(text, dim=-1)[None].expand(batch_size, -1, -1)
    mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=device)

    def step(images):
        # OWL's processor pads to a square and resizes to the model's input size.
        side = max(max(img.shape[-2:]) for img in images)
        x = torch.stack([F.pad(img, (0, side - img.shape[-1], 0, side - img.shape[-2])) for img in images])
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        feature_map, _ = model.image_embedder(pixel_values=x)
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        logits, _ = model.class_predictor(feats, queries[:b], mask[:b])
        boxes = model.box_predictor(feats, feature_map)
        scores = logits.sigmoid()
        if version == 2:
            scores = scores * model.objectness_predictor(feats).sigmoid()[..., None]
        return scores.amax(-1).topk(min(100, h * w), dim=-1), boxes

    return model, step, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", help="fp32, bf16 or fp16 (autocast)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", default="640x853", help="HEIGHTxWIDTH")
    p.add_argument("--labels", type=int, default=80)
    p.add_argument("--proposals", type=int, default=300, help="proposals per image for the region pipelines")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated rows to skip: pool,crop,fast,naive,owlvit,owlvit32,owlv2")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    autocast = autocast_for(args.precision, device)
    size = parse_size(args.image_size)
    images = synthetic_images(args.batch_size, size, device)
    labels = synthetic_labels(args.labels)
    common = dict(batch_size=args.batch_size, image_size=size, num_labels=args.labels,
                  iters=args.iters, warmup=args.warmup)
    region_settings = f"{args.proposals} proposals, {size[0]}x{size[1]}, R50-FPN-v2 RPN"
    rows = []

    def build(mode: str) -> RegionCLIP:
        return RegionCLIP(clip_model="ViT-B-16", clip_pretrained="none", detector="fasterrcnn_resnet50_fpn_v2",
                          detector_weights="none", mode=mode, device=str(device), precision=args.precision,
                          proposals={"num_proposals": args.proposals})

    for mode in ("pool", "crop"):
        if mode not in skip:
            r = run_benchmark(build(mode), **common)
            rows.append((f"regionclip ViT-B/16 {mode}", r["images_per_s"], region_settings))
    if "fast" not in skip:
        fast = RegionCLIP.from_pretrained("fast", clip_pretrained="none", detector_weights="none", device=str(device),
                                          precision=args.precision)
        r = run_benchmark(fast, **common)
        rows.append(("regionclip `fast` preset (ViT-B/32 pool, MobileNetV3-320 RPN)", r["images_per_s"],
                     f"{fast.cfg.proposals.num_proposals} proposals, {size[0]}x{size[1]}, "
                     f"pool short side {fast.cfg.regions.pool_short_side}"))
        del fast
    if "naive" not in skip:
        model = build("crop")
        with torch.inference_mode(), autocast():
            rate = time_images_per_s(lambda: naive_pipeline(model, images, labels), args.batch_size, device,
                                     args.iters, args.warmup)
        rows.append(("naive RPN -> per-crop resize -> ViT-B/16", rate, region_settings + ", crops 224"))
        del model
    for version, name, patch in ((1, "owlvit", 16), (1, "owlvit32", 32), (2, "owlv2", 16)):
        if name in skip:
            continue
        peer = owl_peer(version, device, args.batch_size, args.labels, patch)
        if peer is None:
            print(f"note: transformers is not installed, skipping {name} (pip install -e '.[peers]' in the checkout)")
            continue
        model, step, side = peer
        with torch.inference_mode(), autocast():
            rate = time_images_per_s(lambda: step(images), args.batch_size, device, args.iters, args.warmup)
        label = f"OWL-ViT B/{patch}" if version == 1 else f"OWLv2 B/{patch}"
        rows.append((label, rate, f"{side}x{side} padded square, {(side // patch) ** 2} boxes"))
        del model

    print(f"\nDevice: {device_name(device)}; batch {args.batch_size}, {args.precision}, {args.labels} labels "
          f"(cached), median of {args.iters} after {args.warmup} warm-up, random weights\n")
    print("| system | img/s | settings |\n|---|---:|---|")
    for name, rate, settings in rows:
        print(f"| {name} | {rate:.3g} | {settings} |")


if __name__ == "__main__":
    main()
