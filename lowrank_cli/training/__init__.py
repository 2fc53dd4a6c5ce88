"""Training: losses, one step, the loop (saves, signals, metrics), resumable state, and `recover`."""
