"""Reports: noise-aware statistics (stats), PNG plots (plots), a sweep's comparison from run records (sweep).

numpy and matplotlib only: MLflow is read by arcfold.cli.compare, which hands this package plain records."""
