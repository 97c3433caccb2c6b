"""Training: ``TrainConfig`` + ``train`` (one loop; DDP via torchrun; see ``python -m regionclip.train``)."""

from .config import TrainConfig, load_train_config
from .loop import TrainResult, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "load_train_config", "train"]
