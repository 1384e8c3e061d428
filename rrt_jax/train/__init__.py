"""Training: setup from the config, the loop, jitted steps and losses, metrics, checkpoints and preemption."""
