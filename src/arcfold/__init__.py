"""arcfold: an experiment framework for ARC test-time training.

Layers, each importing only the ones before it:
  arcfold.data      tasks, validation, augmentation, folds, grid codec, submission, scoring (numpy only)
  arcfold.engine    model loading, LoRA, training, prediction and search (torch)
  arcfold.pipeline  one readable run: split, train, predict, select, score
  entry points      arcfold.__main__ (Hydra), arcfold.tracking (MLflow), arcfold.cli.score (CLI)
"""

__version__ = "0.1.0"
