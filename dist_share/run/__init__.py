"""A config resolved into a run: the checked config, its inputs, the session and the run directory."""
