"""Tests of dist_share.data: the in-memory pipeline and TFRecord shards."""
