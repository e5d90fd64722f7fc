"""What the tests share in their own process: paths, job runners, background jobs."""
