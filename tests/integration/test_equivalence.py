"""Every strategy trains the same model to the same variables as a single device.

5 SGD steps with global batch 8 (deterministic ops) under `local`, `mirrored` (2 CPU devices),
`horovod` (2 processes, horovodrun --gloo and plain mpirun) and `multiworker` (2 processes),
for a shared-tower model (one Dense used by 3 streams), a two-tower model (one Embedding
table read by 3 id streams, IndexedSlices gradients), and the models whose rows are coupled
across the batch: the default Siamese config as shipped (batch norm), the two-tower config
with in-batch softmax (global negatives), the multi-view config with batch norm, and a user's
Keras tower with BatchNormalization, folded.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import train_jobs
from tests.helpers.runs import max_diff
from tests.workers.train_worker import COUPLED_MODELS

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(900)]

TOL = 1e-5
LAUNCHERS = ["mirrored", "horovod_gloo", "horovod_mpirun", "multiworker"]


@pytest.fixture(scope="module", autouse=True)
def _launch_early(request: pytest.FixtureRequest) -> None:
    # The launches the selected tests of this module compare with the local run, started now
    # two at a time (and shared with other modules) instead of one after another.
    wanted = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.module is request.module and callspec is not None:
            wanted.add(callspec.params.get("launcher"))
    if wanted - {None}:
        # multiworker first: with horovod_gloo the longest launch (~90 s each, side by side,
        # here), so its tail overlaps the others instead of ending the module. (Its workers also idled up to a minute at exit until the loop
        # freed its input iterator: docs/PERFORMANCE.md section 8.)
        order = ["multiworker", *LAUNCHERS]
        train_jobs.start(
            "local", *[launcher for launcher in dict.fromkeys(order) if launcher in wanted]
        )


@pytest.mark.parametrize("family", ["shared", "two_tower"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_same_variables_as_local(launcher: str, family: str) -> None:
    ref = train_jobs.run("local")[0]["runs"][family]
    moved = max_diff(ref["variables"], ref["initial"])
    assert moved > 100 * TOL, "training must move the variables for the comparison to mean anything"
    for rank, result in train_jobs.run(launcher).items():
        run = result["runs"][family]
        assert run["step"] == 5
        assert max_diff(run["initial"], ref["initial"]) < TOL, f"rank {rank} started elsewhere"
        assert max_diff(run["variables"], ref["variables"]) < TOL, f"rank {rank} of {launcher}"


@pytest.mark.parametrize("launcher", ["mirrored", "horovod_gloo"])
def test_user_tower_same_variables_as_local(launcher: str) -> None:
    """A user's own Keras encoder shared by 3 streams through SharedTower (folded) trains to the
    single-process variables on 2 replicas: MirroredStrategy on 2 CPUs and horovodrun -np 2."""
    ref = train_jobs.run("local")[0]["runs"]["user_tower"]
    assert any("enc_dense" in k for k in ref["variables"]), "the user's layers are trained"
    assert max_diff(ref["variables"], ref["initial"]) > 100 * TOL
    for rank, result in train_jobs.run(launcher).items():
        run = result["runs"]["user_tower"]
        assert run["step"] == 5
        assert max_diff(run["initial"], ref["initial"]) < TOL, f"rank {rank} started elsewhere"
        assert max_diff(run["variables"], ref["variables"]) < TOL, f"rank {rank} of {launcher}"


# tests/workers/train_common.py: CONFIG_MODELS, and build_user_tower("batch"). Mined triplets
# (batch-hard, semi-hard) and the corrected in-batch softmax (accidental hits, logQ) gather
# labels and ids across replicas as well as rows.
COUPLED = list(COUPLED_MODELS)
COUPLED_SUM = [m for m in COUPLED if m != "triplet_semi"]
COUPLED_FIT = ["siamese_cfg", "two_tower_ibs", "triplet_mined", "two_tower_corrected"]


def _same_run(ref: dict, run: dict, where: str) -> None:
    assert run["step"] == 5, where
    assert max_diff(run["initial"], ref["initial"]) < TOL, f"{where} started elsewhere"
    assert max_diff(run["variables"], ref["variables"]) < TOL, where
    for name, value in ref["eval"].items():
        assert abs(run["eval"][name] - value) < TOL, f"{where}: eval {name}"


@pytest.mark.parametrize("model", COUPLED)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_batch_coupled_models_same_variables_as_local(launcher: str, model: str) -> None:
    """Batch norm takes its moments over the global batch and in-batch softmax its negatives
    from it, so 2 replicas of batch 4 train what one of batch 8 does; the eval metrics (with a
    partial last batch, split unevenly) agree too."""
    ref = train_jobs.run("local")[0]["runs"][model]
    assert max_diff(ref["variables"], ref["initial"]) > 100 * TOL
    for rank, result in train_jobs.run(launcher).items():
        _same_run(ref, result["runs"][model], f"rank {rank} of {launcher}, {model}")


@pytest.mark.parametrize("model", COUPLED_SUM)
def test_batch_coupled_models_under_horovod_sum(model: str) -> None:
    """Horovod's ``op: sum`` (loss over the global batch, gradients summed) ends where the
    default average does and where one process does."""
    ref = train_jobs.run("local")[0]["runs"][model]
    for rank, result in train_jobs.run("horovod_gloo").items():
        _same_run(ref, result["runs"][f"{model}_sum"], f"rank {rank}, {model}, op sum")


@pytest.mark.parametrize("model", COUPLED_FIT)
@pytest.mark.parametrize("launcher", ["mirrored", "horovod_gloo", "multiworker"])
def test_batch_coupled_models_under_keras_fit(launcher: str, model: str) -> None:
    ref = train_jobs.run("local")[0]["runs"][f"{model}_fit"]
    assert max_diff(ref["variables"], ref["initial"]) > 100 * TOL
    for rank, result in train_jobs.run(launcher).items():
        _same_run(ref, result["runs"][f"{model}_fit"], f"rank {rank} of {launcher}, {model} fit")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_replicas_hold_identical_variables(launcher: str) -> None:
    results = train_jobs.run(launcher)
    for family in ("shared", "two_tower", *COUPLED):
        copies = [c for r in results.values() for c in r["runs"][family]["replica_checksums"]]
        assert len(copies) == 2, "two replicas expected (2 devices or 2 processes)"
        for c in copies[1:]:
            assert c == copies[0], f"{launcher}/{family}: replicas diverged"


@pytest.mark.parametrize("launcher", ["mirrored", "horovod_gloo", "multiworker"])
def test_each_example_seen_once_per_epoch(launcher: str) -> None:
    seen: dict[str, list[int]] = {}
    for result in train_jobs.run(launcher).values():
        seen.update(result["ids"])
    assert sorted(seen) == ["0", "1"]
    a, b = set(seen["0"]), set(seen["1"])
    assert len(a) == len(seen["0"]) and len(b) == len(seen["1"])
    assert not a & b, "two replicas saw the same example"
    assert a | b == set(range(64))


def test_shared_variable_step_is_sum_over_streams_and_replicas() -> None:
    """Replay the 5 SGD steps by hand: the shared kernel moves by -lr * the sum of its per-stream
    gradients over the global batch (both replicas' halves), computed with one perturbation per
    stream so that each stream's contribution is obtained separately."""
    import tensorflow as tf

    from tests.workers import train_common as tc

    run = train_jobs.run("mirrored")[0]["runs"]["shared"]
    w = {k: tf.constant(np.asarray(v, np.float32)) for k, v in run["initial"].items()}
    tf.random.set_seed(3)  # the trainer's training.seed: fixes the shuffle order
    ds = tc.make_dataset_fn("shared", 8)(tf.distribute.InputContext()).repeat()
    lr, streams = 0.1, tc.STREAMS["shared"]
    for features, labels in ds.take(5):
        deltas = {s: tf.zeros_like(w["shared/kernel"]) for s in streams}
        params = {k: w[k] for k in w if k != "shared/kernel"}
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(list(deltas.values()) + list(params.values()))
            hs = [
                tf.tanh(features[s] @ (w["shared/kernel"] + deltas[s]) + params["shared/bias"])
                for s in streams
            ]
            out = tf.concat(hs, 1) @ params["head/kernel"] + params["head/bias"]
            loss = tf.reduce_mean(tc.squared_error(labels, out))
        per_stream = [tape.gradient(loss, deltas[s]) for s in streams]
        for g in per_stream:
            # Every stream contributes, so dropping any one would change the step.
            assert float(tf.reduce_max(tf.abs(g))) > 1e-4
        w["shared/kernel"] = w["shared/kernel"] - lr * tf.add_n(per_stream)
        for k, v in params.items():
            w[k] = v - lr * tape.gradient(loss, v)
    got = {k: np.asarray(v) for k, v in run["variables"].items()}
    assert max_diff(got, {k: v.numpy() for k, v in w.items()}) < TOL


def test_dedup_same_update_fewer_bytes() -> None:
    for launcher in ("local", "mirrored", "horovod_gloo"):
        runs = train_jobs.run(launcher)[0]["runs"]
        dedup, naive = runs["two_tower"], runs["two_tower_naive"]
        assert max_diff(dedup["variables"], naive["variables"]) < TOL
        assert dedup["last_logs"]["comm_bytes_per_step"] < naive["last_logs"]["comm_bytes_per_step"]


def test_horovod_options_keep_the_result() -> None:
    runs = train_jobs.run("horovod_gloo")[0]["runs"]
    ref = runs["two_tower"]
    # Summing (loss / global batch) and averaging (loss / replica batch) are the same step.
    assert max_diff(runs["two_tower_sum"]["variables"], ref["variables"]) < TOL
    # fp16 compression: close, and the float payload is halved.
    assert max_diff(runs["two_tower_fp16"]["variables"], ref["variables"]) < 1e-3
    assert (
        runs["two_tower_fp16"]["last_logs"]["comm_bytes_per_step"]
        < ref["last_logs"]["comm_bytes_per_step"]
    )


def test_grad_accumulation_and_dense_switch_match() -> None:
    runs = train_jobs.run("local")[0]["runs"]
    assert max_diff(runs["shared_accum"]["variables"], runs["shared"]["variables"]) < TOL
    dense, sparse = runs["two_tower_dense"], runs["two_tower"]
    assert max_diff(dense["variables"], sparse["variables"]) < TOL
    # The dense switch sends the whole table: 200 x 4 floats more than the deduplicated rows.
    assert dense["last_logs"]["comm_bytes_per_step"] > 200 * 4 * 4


def test_horovod_ranks_agree_on_batch_norm_statistics() -> None:
    """Each Horovod rank updates its moving statistics from its own shard; the trainer averages
    them before evaluating, saving and finishing, so the ranks end identical (all variables)."""
    results = train_jobs.run("horovod_gloo")
    copies = [r["runs"]["shared_bn"]["replica_checksums"][0] for r in results.values()]
    assert any("moving" in k for k in copies[0])
    assert copies[0] == pytest.approx(copies[1], rel=1e-6)
