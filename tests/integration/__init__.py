"""End-to-end tests: whole jobs under real launchers, clusters, the CLI, examples, benchmarks."""
