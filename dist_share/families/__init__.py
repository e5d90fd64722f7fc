"""Model families: what a Siamese, triplet, multi-view or two-tower job is, and its Keras model."""
