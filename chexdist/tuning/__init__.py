"""Ray Tune over chexdist's training function: space (the YAML), options (TuneOptions), trial, tuner, results, restore."""
