"""Command-line tools beside `python -m arcfold`: compare (runs from MLflow) and score (a submission)."""
