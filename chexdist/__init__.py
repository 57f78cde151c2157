"""chexdist: train and evaluate chest X-ray classifiers on NIH ChestX-ray14-format data at scale."""

__version__ = "0.1.0"
