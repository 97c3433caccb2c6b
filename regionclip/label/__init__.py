"""``regionclip label``: label an image collection in resumable Parquet shards.

``sources`` (what is read), ``items`` (the expanded list, on disk, read a shard at a time),
``shards`` (how the work is cut and who does which part),
``store`` (the shard files and ``manifest.json``; ``records.load_results`` reads a folder back), ``run`` (the job over
``Predictor.stream``), ``ray_engine`` (the same job under Ray Data). pyarrow is the optional
``regionclip[label]`` extra: it is imported only when a shard is written or read.
"""

from .run import LabelSummary, label_images, model_identity
from .shards import Shard, plan
from .sources import TarMember, expand_sources

__all__ = ["LabelSummary", "Shard", "TarMember", "expand_sources", "label_images", "model_identity", "plan"]
