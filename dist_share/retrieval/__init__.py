"""Using trained towers: exact top-k over a corpus, retrieval metrics, embedding shards, an approximate index."""
