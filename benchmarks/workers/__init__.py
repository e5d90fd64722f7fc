"""Benchmark worker processes: each writes its measurements as JSON into the directory in argv[1]."""
