"""Horovod idle probe: what a rank costs while it waits, and what one small collective costs.

argv: OUT_DIR [--idle-seconds S] [--collectives N] (run under horovodrun or mpirun)

After ``hvd.init()`` and one warm-up allreduce every rank (1) sleeps `idle_seconds` in Python
and records the process CPU time used meanwhile: that is Horovod's background thread (and the
transport's progress engine) polling with nothing to do, time the rank's peer on a shared core
cannot use; (2) runs `collectives` tiny allreduces one after another in a tf.while_loop and
records the wall time per collective (the latency a step pays per dependent collective).
Neither number depends much on other load on the machine: (1) is CPU time, and (2) is a
median over rounds.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.workers.wlib import common_args, setup_threads, write_result


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--idle-seconds", type=float, default=3.0)
    p.add_argument("--collectives", type=int, default=200)
    args = p.parse_args()
    setup_threads(args.intra, args.inter)
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    x = tf.ones([2])
    hvd.allreduce(x, name="warmup").numpy()

    @tf.function
    def chain(x: tf.Tensor) -> tf.Tensor:
        def body(i, y):
            return i + 1, hvd.allreduce(y, op=hvd.Average, name="chain")

        return tf.while_loop(lambda i, y: i < args.collectives, body, (tf.constant(0), x))[1]

    chain(x).numpy()
    idle = []
    latency = []
    for _ in range(3):
        c0 = time.process_time()
        time.sleep(args.idle_seconds)
        idle.append((time.process_time() - c0) / args.idle_seconds)
        hvd.allreduce(x, name="sync").numpy()
        t0 = time.perf_counter()
        chain(x).numpy()
        latency.append((time.perf_counter() - t0) / args.collectives)
    write_result(
        args.out_dir,
        f"idle_probe_rank{hvd.rank()}",
        {
            "rank": hvd.rank(),
            "idle_cpu_fraction": statistics.median(idle),
            "seconds_per_collective": statistics.median(latency),
        },
    )


if __name__ == "__main__":
    main()
