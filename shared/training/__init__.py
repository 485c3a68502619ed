"""Config, model registry, the training engine and checkpoints."""
