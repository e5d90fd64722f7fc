"""Link probe: time of one Horovod allreduce against its size, to fit latency and bandwidth.

argv: OUT_DIR [--sizes BYTES,...] [--repeats N] (run under horovodrun or mpirun)

Each size is all-reduced `repeats` times inside one tf.function (a tf.while_loop whose next
input depends on the previous result, so the collectives run one after another); the median
time per allreduce over rounds is written per size. The scaling model fits
``t(n) = a + n / B`` (a = 2 log2(W) x latency for W = 2) to these points.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.workers.wlib import common_args, setup_threads, write_result


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--sizes", default="8,4096,65536,524288,2097152,8388608")
    args = p.parse_args()
    setup_threads(args.intra, args.inter)
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    out = []
    for nbytes in (int(s) for s in args.sizes.split(",")):
        x = tf.ones([max(1, nbytes // 4)], tf.float32)

        @tf.function
        def loop(x: tf.Tensor, n: int = args.block) -> tf.Tensor:
            def body(i, y):
                return i + 1, hvd.allreduce(y, op=hvd.Average, name="probe") * 1.0

            return tf.while_loop(lambda i, y: i < n, body, (tf.constant(0), x))[1]

        times = []
        for r in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            loop(x).numpy()
            if r >= args.warmup:
                times.append((time.perf_counter() - t0) / args.block)
        out.append({"bytes": 4 * int(x.shape[0]), "seconds": statistics.median(times)})
    write_result(
        args.out_dir,
        f"allreduce_probe_rank{hvd.rank()}",
        {"rank": hvd.rank(), "size": hvd.size(), "points": out},
    )


if __name__ == "__main__":
    main()
