"""Ray Tune over chexdist's training function: search space, trial, tuner, results, restore."""
