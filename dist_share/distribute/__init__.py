"""Where replicas live (strategies), what they send (gradients) and the cluster a job runs in."""
