"""One training loop for every method of Table 1 (`train`), its configuration and methods."""

from flatmin.train.checkpoint import Run, load_run
from flatmin.train.config import TrainConfig
from flatmin.train.loop import evaluate, train
from flatmin.train.methods import METHODS, get_method

__all__ = ["METHODS", "Run", "TrainConfig", "evaluate", "get_method", "load_run", "train"]
