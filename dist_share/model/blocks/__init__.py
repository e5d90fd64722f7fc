"""The per-stream computation a tower shares, described as plain data (the YAML ``block:``)."""
