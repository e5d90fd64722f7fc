"""Data: the contract between sources and models, the built-in sources, dataset functions and TFRecord shards."""
