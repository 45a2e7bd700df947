"""Where folds run: devices, worker pools (this process, a process per device, Ray actors) and the fold queue."""
