"""Tests of dist_share.compat: the TF1 graph-mode helpers."""
