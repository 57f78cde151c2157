"""`chexdist bench NAME` suites: one module per suite, plus CPU timing and fixtures."""
