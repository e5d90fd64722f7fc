"""Tests of dist_share.launch: host lists, launch commands, scripts and containers."""
