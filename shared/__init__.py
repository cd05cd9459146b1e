"""What the three implementations share: data, metrics, model spec, checkpoints, training loop."""
