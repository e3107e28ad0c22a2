"""The training machinery: configs, batches, the one fit() loop both tasks share, the tasks, run
folders (run_files.py, torch-free) and rebuilding a run's model (runs.py), checkpoints, decoding,
metrics and the frozen text prefix."""
