"""The tests: one folder per subpackage of dist_share, end-to-end jobs in integration/."""
