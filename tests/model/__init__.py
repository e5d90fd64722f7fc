"""Tests of dist_share.model: blocks, towers, folding, batch-coupled layers."""
