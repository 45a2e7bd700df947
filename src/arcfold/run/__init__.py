"""A run's own machinery under the pipeline: the fold worker (engine passed in), its jobs and ledger, results and
tables, checkpoints, the time budget, failures and progress."""
