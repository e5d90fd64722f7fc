"""Tests of dist_share.config: the schema, loading and the shipped configs."""
