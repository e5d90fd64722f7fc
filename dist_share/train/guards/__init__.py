"""Guards a training loop runs under: non-finite values, preemption (SIGTERM), stalled peers."""
