"""Stage two: tokens + text -> a trained model, and what is done with finished runs.

- zoo/: what a model is made of (text encoder, visual tokens, fusions, heads, losses, the registry);
- engine/: how it is trained (configs, batches, the one fit() loop, tasks, run folders, checkpoints);
- report/: what uses finished runs (evaluate, predict, results, significance, cases, plots, ablations).

The dataset readers are not here: both stages read data folders, and stage one never imports stage
two, so they live in mner.cache (cache/conll.py, cache/datasets.py, cache/classification.py).
"""
