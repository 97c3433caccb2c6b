"""Keep label embeddings on disk, so a vocabulary is encoded by the text tower once, not every run.

Shows the text-embedding cache: ``RegionCLIP.from_pretrained(..., text={"cache_dir": DIR})`` (the same
as ``--set text.cache_dir=DIR`` or ``regionclip detect --text-cache DIR`` on the command line).
Each label is embedded through every prompt template ("a {}.", "a photo of a {}.", ...) and the
results are stored in DIR, keyed by the model's weights and templates. ``model.text.prompts_encoded``
counts the prompts the text tower actually ran: the first model fills the cache, a second model
(a new process in real use) reads it and encodes 0 prompts, and gets the same embeddings.

Run (offline, demo model; 7 s of CPU time, 6 of them importing torch):

    python examples/text_cache.py                          # a fresh cache folder in OUT/text-cache
    python examples/text_cache.py --cache-dir ~/.cache/regionclip-text --labels "dog,cat,red bicycle"

Run it twice with the same ``--cache-dir``: the second time, both models encode 0 prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from regionclip import RegionCLIP
from regionclip.data.shapes import CATEGORIES


def encode(model: RegionCLIP, labels: list[str]) -> tuple[torch.Tensor, int, float]:
    """Embeddings, prompts the text tower ran for them, seconds taken."""
    before = model.text.prompts_encoded
    start = time.perf_counter()
    embeddings = model.encode_text(labels)
    return embeddings, model.text.prompts_encoded - before, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, help="where embeddings are kept (default: OUT/text-cache)")
    parser.add_argument("--labels", default=",".join(CATEGORIES), help="comma-separated vocabulary (default: the 12 shapes names)")
    parser.add_argument("--model", default="demo", help="preset name or preset YAML (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("text_cache_demo"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    cache_dir = args.cache_dir or args.out / "text-cache"

    first = RegionCLIP.from_pretrained(args.model, text={"cache_dir": str(cache_dir)})
    emb1, encoded1, seconds1 = encode(first, labels)
    templates = len(first.cfg.text.templates)
    print(f"first model:  {encoded1:4d} prompts encoded ({len(labels)} labels x {templates} templates) in {seconds1 * 1000:.0f} ms")

    # A second model with the same weights and templates, as a later run would build it.
    second = RegionCLIP.from_pretrained(args.model, text={"cache_dir": str(cache_dir)})
    emb2, encoded2, seconds2 = encode(second, labels)
    print(f"second model: {encoded2:4d} prompts encoded, read from {cache_dir} in {seconds2 * 1000:.0f} ms")

    same = torch.allclose(emb1.cpu(), emb2.cpu())
    files = sorted(p.name for p in cache_dir.iterdir())
    print(f"same embeddings: {same}; cache files: {', '.join(files)}")
    return {"first": encoded1, "second": encoded2, "same": same, "cache_files": files, "labels": len(labels),
            "templates": templates}


if __name__ == "__main__":
    main()
