"""Benchmarks: where the time and the bytes go, against plain TensorFlow and Horovod.

Every module ``bench_<name>.py`` exposes ``run(quick: bool = False) -> dict`` (with a ``"table"``
list of row dicts) and ``main()``; ``python -m benchmarks.run_all [--quick]`` runs them all.
"""
