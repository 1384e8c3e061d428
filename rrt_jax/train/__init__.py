"""Training: losses and jitted steps."""
