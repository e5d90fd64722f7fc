"""Tests of dist_share.distribute: strategies, launcher discovery and gradient reduction."""
