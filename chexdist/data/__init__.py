"""Data: dataset readers, patient-wise splits, synthetic data, images, the shard format, pack, verify, the loader, transforms."""
