"""Training: the state a run keeps, its logs, evaluation, checkpoints and the training loops."""
