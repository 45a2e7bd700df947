"""MLflow: one run per Hydra job, a sweep's parent run and its callback, links into the UI, runs read back."""
