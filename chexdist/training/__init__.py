"""Training: the one loop (`engine.fit`), checkpoints, preflight, losses, optimizers, launcher."""
