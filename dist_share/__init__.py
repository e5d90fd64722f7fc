"""dist_share: one set of weights, many input streams, many replicas.

Importing the package is cheap and never imports Horovod; Horovod is loaded only by the
``horovod`` strategy.
"""

__version__ = "0.1.0"
