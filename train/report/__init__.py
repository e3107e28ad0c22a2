"""What uses finished runs: evaluate, predict, results tables, significance, case pages, plots, and the
ablation runner that trains arms x seeds and tabulates them."""
