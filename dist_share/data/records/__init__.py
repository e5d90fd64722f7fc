"""TFRecord shards: a data set written as files of tf.train.Example plus a manifest, streamed back."""
