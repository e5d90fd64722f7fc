"""Real Slurm and podman clusters for the cluster tests."""
