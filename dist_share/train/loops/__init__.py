"""Training loops: the compiled custom loop, Keras fit, the custom loop under elastic Horovod."""
