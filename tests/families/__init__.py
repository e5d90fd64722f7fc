"""Tests of dist_share.families: every model family built, fitted and saved."""
