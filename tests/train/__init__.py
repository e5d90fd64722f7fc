"""Tests of dist_share.train: the trainer, its loops, accumulation and evaluation."""
