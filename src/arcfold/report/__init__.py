"""Reports: noise-aware statistics (stats), PNG plots (plots, runplots), a sweep's comparison from plain run records
(comparison) and its files (comparison_files, document: Markdown and self-contained HTML). numpy and matplotlib
only: MLflow is read by arcfold.track.runs, which hands this package plain records."""
