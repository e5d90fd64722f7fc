"""The dist-share command line end to end: real processes, real training, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_share.errors import ConfigError
from dist_share.run import directory as rundir
from dist_share.run.resolve import load_config, validate
from tests.helpers import background
from tests.helpers.paths import CONFIGS, EXE, WORKERS
from tests.helpers.processes import JobResult, dist_share_launch, run_job
from tests.helpers.runs import metrics

# A few steps on a small slice of the data: enough to exercise every piece, fast on 2 cores.
SHORT = [
    "--set",
    "training.steps=3",
    "--set",
    "training.log_every=1",
    "--set",
    "training.eval_every=0",
    "--set",
    "data.train_examples=256",
    "--set",
    "data.eval_examples=64",
    "--set",
    "training.batch_size=16",
    "--set",
    "checkpoint.every=3",
    "--set",
    "logging.progress_bar=false",
    "--set",
    "logging.tensorboard=true",
]


def dist_share(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def _check_run(run_dir: Path, cfg_path: Path, extra: list[str], strategy: str) -> list[dict]:
    """config.yaml is the resolved config; metrics.jsonl has every step once and a final eval."""
    expected = load_config(
        cfg_path, [*_overrides(SHORT), *_overrides(extra), f"strategy.name={strategy}"]
    )
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == expected.to_dict()
    records = metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert len(evals) == 1 and evals[0]["step"] == 3 and "loss" in evals[0]
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))  # no NaN
    assert any((run_dir / "checkpoints").glob("*.index"))
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    return records


# -- fast: no TensorFlow -----------------------------------------------------------------------
def test_importing_the_cli_loads_neither_tensorflow_nor_horovod() -> None:
    code = "import sys, dist_share.cli; bad = [m for m in ('tensorflow', 'horovod', 'keras') if m in sys.modules]; sys.exit(bool(bad))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_a_typo_outside_the_model_is_reported_before_tensorflow_loads() -> None:
    # Checking the model's blocks imports Keras and TensorFlow (seconds); the other sections
    # are checked first, so a typo there is reported at once.
    code = (
        "import sys\n"
        "from dist_share.run.resolve import validate\n"
        "from dist_share.errors import ConfigError\n"
        "try:\n"
        "    validate({'model': {'family': 'siamese'}, 'training': {'stpes': 3}})\n"
        "except ConfigError as e:\n"
        "    assert 'training.stpes' in str(e), e\n"
        "else:\n"
        "    sys.exit('no ConfigError')\n"
        "loaded = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "sys.exit(f'loaded {loaded}' if loaded else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_version_help_and_usage_errors() -> None:
    out = dist_share("--version")
    assert out.returncode == 0 and "dist-share 0.1.0" in out.stdout
    out = dist_share("--help")
    assert out.returncode == 0
    for word in ("train", "evaluate", "export", "config", "launch", "exit codes"):
        assert word in out.stdout
    assert dist_share("train").returncode == 2  # missing CONFIG
    assert dist_share("frobnicate").returncode == 2


def test_config_command_prints_the_resolved_config() -> None:
    out = dist_share("config", str(CONFIGS / "multiview_digits.yaml"), "--set", "data.num_views=4")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    expected = load_config(CONFIGS / "multiview_digits.yaml", ["data.num_views=4"])
    assert printed == expected.to_dict()
    assert "view3" in out.stderr


BAD_CONFIGS = {
    "wrong_type": (
        "model: {family: siamese}\ntraining: {batch_size: lots}\n",
        [],
        "training.batch_size",
    ),
    "unknown_key": ("model: {family: siamese}\ntraining: {stpes: 3}\n", [], "did you mean 'steps'"),
    "missing_required": ("model: {embedding_dim: 8}\n", [], "model.family"),
    "negative_batch": (
        "model: {family: siamese}\n",
        ["--set", "training.batch_size=-4"],
        "training.batch_size",
    ),
    "unparsable": ("model: {family: siamese\n", [], "not valid YAML"),
    # a per-example loss compares no rows: it has no negatives to take from anywhere
    "negatives_on_a_per_example_loss": (
        "model: {family: siamese, loss: {type: contrastive, negatives: global}}\n",
        [],
        "model.loss.negatives: loss 'contrastive' compares no rows",
    ),
    # only batch norm has batch statistics to synchronise
    "norm_sync_without_batch_norm": (
        "model: {family: siamese, tower: {block: {type: conv2d, norm: layer, norm_sync: false}}}\n",
        [],
        "model.tower.block.norm_sync: only norm: batch has batch statistics to synchronise",
    ),
    "negatives_of_another_kind": (
        "model: {family: two_tower, loss: {type: in_batch_softmax, negatives: nearby}}\n",
        [],
        "model.loss.negatives: got 'nearby', expected one of global, local",
    ),
    "stream_count": (
        "model: {family: multiview}\ndata: {source: npz, train_path: views.npz, num_views: 3}\n",
        [],
        "data.num_views",
    ),
    # Mining, accidental hits, logQ and the class-balanced sampler, each asked of data or a
    # loss that cannot honour it.
    "mining_without_class_labels": (
        "model: {family: triplet, loss: {type: triplet, mining: batch_hard}}\n"
        "data: {source: npz, train_path: items.npz}\n",
        [],
        "data.train_path (items.npz, 'labels'): model.loss.mining needs each row's class",
    ),
    "mining_a_loss_without_classes": (
        "model: {family: two_tower, loss: {type: in_batch_softmax, mining: batch_hard}}\n",
        [],
        "model.loss.mining: loss 'in_batch_softmax' has no class labels to mine",
    ),
    "semi_hard_pairs": (
        "model: {family: siamese, loss: {type: contrastive, mining: semi_hard}}\n",
        [],
        "model.loss.mining: got 'semi_hard', expected one of none, batch_hard",
    ),
    "accidental_hits_of_a_binary_loss": (
        "model: {family: two_tower, loss: {type: binary, remove_accidental_hits: true}}\n",
        [],
        "model.loss.remove_accidental_hits: loss 'binary' compares no candidates",
    ),
    "logq_without_candidate_ids": (
        "model:\n  family: two_tower\n"
        "  loss: {type: in_batch_softmax, logq_correction: true}\n"
        "  query: {features: {query_user: users, candidate_item: items}}\n"
        "  candidate: {features: {query_history: items}}\n",
        [],
        "model.loss.logq_correction: needs candidate ids, the values of stream candidate_item, "
        "but it feeds model.query",
    ),
    "logq_alpha_above_one": (
        "model: {family: two_tower, loss: {type: in_batch_softmax, logq_alpha: 2}}\n",
        [],
        "model.loss.logq_alpha: must be a number in (0, 1], got 2",
    ),
    "a_correction_that_is_not_a_boolean": (
        "model: {family: two_tower, loss: {type: in_batch_softmax, "
        "remove_accidental_hits: sometimes}}\n",
        [],
        "model.loss.remove_accidental_hits: must be true or false, got 'sometimes'",
    ),
    "sampler_without_classes": (
        "model: {family: siamese}\ndata: {sampler: {type: class_balanced}}\n",
        [],
        "data.sampler.type: class_balanced draws rows by class, but the rows have no classes",
    ),
    "sampler_wanting_more_classes_than_the_data_has": (
        "model: {family: triplet, loss: {type: triplet, mining: batch_hard}}\n"
        "data: {sampler: {type: class_balanced, classes_per_batch: 12, examples_per_class: 2}}\n"
        "training: {batch_size: 24}\n",
        [],
        "data.sampler.classes_per_batch: asks for 12 classes per batch but the train split has 10",
    ),
    "sampler_not_filling_the_batch": (
        "model: {family: triplet, loss: {type: triplet, mining: batch_hard}}\n"
        "data: {sampler: {type: class_balanced, classes_per_batch: 4, examples_per_class: 4}}\n",
        [],
        "data.sampler.examples_per_class: classes_per_batch x examples_per_class = 4 x 4 = 16, "
        "but training.batch_size is 64",
    ),
    "sampler_over_streamed_shards": (
        "model: {family: triplet, loss: {type: triplet, mining: batch_hard}}\n"
        "data:\n  source: tfrecord\n  tfrecord: {train: shards}\n"
        "  sampler: {type: class_balanced, classes_per_batch: 8, examples_per_class: 8}\n",
        [],
        "data.sampler.type: class_balanced picks rows by class from memory; source tfrecord",
    ),
    "labels_against_the_loss": (
        "model: {family: triplet}\ndata: {labels: classes}\n",
        [],
        "data.labels: is 'classes' but model.loss makes it 'given'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_exit_2_name_the_key_and_leave_no_run_dir(tmp_path: Path, case: str) -> None:
    import numpy as np

    text, extra, needle = BAD_CONFIGS[case]
    np.savez(
        tmp_path / "views.npz",
        **{f"view{i}": np.zeros((4, 8, 8, 1)) for i in range(4)},
        labels=np.zeros(4),
    )
    # single items whose labels are scores, not classes
    np.savez(tmp_path / "items.npz", item=np.zeros((4, 8, 8, 1)), labels=np.full(4, 0.5))
    (tmp_path / "bad.yaml").write_text(text)
    out = dist_share("train", "bad.yaml", "--run-dir", "run", *extra, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, nothing buried
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_a_run_dir_of_another_config_is_refused_and_left_untouched(tmp_path: Path) -> None:
    cfg_path = CONFIGS / "siamese_digits.yaml"
    run = tmp_path / "run"
    rundir.prepare(run, load_config(cfg_path, ["model.embedding_dim=8"]), "new")
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = dist_share("train", str(cfg_path), "--run-dir", str(run), *SHORT)
    assert out.returncode == 2
    assert "model.embedding_dim: 8 -> 32" in out.stderr and "--overwrite" in out.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_run_dir_decisions_and_overwrite_keep_the_users_own_files(tmp_path: Path) -> None:
    base = validate({"model": {"family": "siamese"}})
    longer = validate(
        {
            "model": {"family": "siamese"},
            "training": {"steps": 900},
            "strategy": {"name": "horovod"},
            "logging": {"tensorboard": False},
        }
    )
    other = validate({"model": {"family": "siamese"}, "optimizer": {"learning_rate": 0.1}})
    run = tmp_path / "run"
    assert rundir.check(run, base) == "new"
    rundir.prepare(run, base, "new")
    assert rundir.read_config(run) == base
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left
    # More steps, another strategy or other logging continue the same run.
    assert rundir.check(run, longer) == "resume"
    with pytest.raises(ConfigError, match="optimizer.learning_rate: 0.001 -> 0.1"):
        rundir.check(run, other)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-1.index").write_text("x")
    (run / "notes.txt").write_text("mine")
    assert rundir.check(run, other, overwrite=True) == "overwrite"
    rundir.prepare(run, other, "overwrite")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert rundir.read_config(run) == other
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "data.csv").write_text("1")
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        rundir.check(stray, base)


def test_launch_dry_run_prints_the_exact_commands() -> None:
    out = dist_share(
        "launch",
        "--launcher",
        "horovodrun",
        "--hosts",
        "node1:4,node2:4",
        "--dry-run",
        "--",
        "dist-share",
        "train",
        "cfg.yaml",
        "--strategy",
        "horovod",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "horovodrun -np 8 -H node1:4,node2:4 --gloo dist-share train cfg.yaml --strategy horovod"
    )
    out = dist_share(
        "launch", "--launcher", "mpirun", "--hosts", "a:2,b:2", "-np", "3", "--dry-run", "--", "x"
    )
    assert out.stdout.startswith("mpirun -np 3 -H a:2,b:2 -bind-to none -map-by slot")
    out = dist_share(
        "launch", "--launcher", "horovodrun", "--hosts", "a:2", "-np", "4", "--dry-run", "--", "x"
    )
    assert out.returncode == 2 and "2 slots" in out.stderr
    assert dist_share("launch", "--dry-run").returncode == 2  # no command


# -- TensorFlow: real training -----------------------------------------------------------------
# The trainings below are independent processes, started two at a time when the module begins
# (tests/helpers/background.py), so that they run beside the module's other tests.
OTHER_CONFIGS = [
    "triplet_digits",
    "triplet_digits_mined",
    "multiview_digits",
    "two_tower_synthetic",
    "two_tower_retrieval",
]
# What a config needs beside SHORT: the class-balanced sampler's P x K must be the batch (16).
CONFIG_EXTRA = {"triplet_digits_mined": ["--set", "data.sampler.examples_per_class=2"]}


def _train_argv(run: Path, name: str, *extra: str) -> list[str]:
    return [EXE, "train", str(CONFIGS / f"{name}.yaml"), "--run-dir", str(run), *SHORT, *extra]


def _train_short(run: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return dist_share(*_train_argv(run, name, *extra)[1:])


def _mirrored(run: Path) -> JobResult:
    return run_job(_train_argv(run, "siamese_digits", "--strategy", "mirrored", *MIRRORED), 300)


def _horovod_via_launch(run: Path) -> JobResult:
    train = _train_argv(run, "siamese_digits", "--strategy", "horovod")
    return run_job(dist_share_launch("horovodrun", train, "--network-interface", "lo"), 400)


MIRRORED = ["--set", "strategy.num_cpu_devices=2"]
BAD_NORM = ["--set", "model.tower.block.norm=bogus"]


def background_jobs(root: Path) -> dict[str, Callable[[], tuple[Path, Any]]]:
    trainings: dict[str, Callable[[Path], Any]] = {
        "cli/siamese": lambda run: _train_short(run, "siamese_digits"),
        "cli/mirrored": _mirrored,
        "cli/horovod_launch": _horovod_via_launch,
        "cli/bad_norm": lambda run: _train_short(run, "siamese_digits", *BAD_NORM),
    }
    for name in OTHER_CONFIGS:
        extra = CONFIG_EXTRA.get(name, [])
        trainings[f"cli/{name}"] = lambda run, name=name, extra=extra: _train_short(
            run, name, *extra
        )
    return {key: _in_run_dir(train, root / key) for key, train in trainings.items()}


def _in_run_dir(train: Callable[[Path], Any], run: Path) -> Callable[[], tuple[Path, Any]]:
    """A job that trains into ``run`` and returns it with the process's result."""
    return lambda: (run, train(run))


@pytest.fixture(scope="module")
def siamese_run() -> Path:
    run, out = background.result("cli/siamese")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "final eval (step 3): loss=" in out.stdout
    return run


@pytest.mark.slow
@pytest.mark.background("cli/siamese")
def test_default_config_trains_locally(siamese_run: Path) -> None:
    records = _check_run(siamese_run, CONFIGS / "siamese_digits.yaml", [], "local")
    assert "pair_accuracy" in records[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.background(f"cli/{n}")) for n in OTHER_CONFIGS]
)
def test_every_other_config_trains_a_few_steps_locally(name: str) -> None:
    run, out = background.result(f"cli/{name}")
    assert out.returncode == 0, out.stdout + out.stderr
    _check_run(run, CONFIGS / f"{name}.yaml", CONFIG_EXTRA.get(name, []), "local")


@pytest.mark.slow
@pytest.mark.background("cli/siamese")
def test_same_config_resumes_and_extends_the_run(siamese_run: Path, tmp_path: Path) -> None:
    """Re-running the same config continues from the checkpoint instead of starting over."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(siamese_run, run)
    out = dist_share(
        "train", str(CONFIGS / "siamese_digits.yaml"), "--run-dir", str(run), *SHORT, "--steps", "5"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [r["step"] for r in metrics(run, "train")]
    assert steps == [1, 2, 3, 4, 5]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["steps"] == 5


@pytest.fixture(scope="module")
def siamese_evaluated(siamese_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    import shutil

    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(siamese_run, run)
    return run, dist_share("evaluate", str(run))


@pytest.mark.slow
@pytest.mark.background("cli/siamese")
def test_evaluate_a_run_directory(siamese_evaluated: tuple, tmp_path: Path) -> None:
    run, out = siamese_evaluated
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eval (step 3): loss=" in out.stdout and "pair_accuracy=" in out.stdout
    assert [r["split"] for r in metrics(run)[-2:]] == ["eval", "eval"]
    missing = dist_share("evaluate", str(tmp_path))
    assert missing.returncode == 2 and "config.yaml" in missing.stderr


@pytest.mark.slow
@pytest.mark.background("cli/siamese")
def test_evaluating_a_run_reproduces_its_final_eval(siamese_evaluated: tuple) -> None:
    run, out = siamese_evaluated
    final, again = (r for r in metrics(run)[-2:])
    assert final["step"] == again["step"] == 3
    for key in ("loss", "pair_accuracy"):
        assert again[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.background("cli/siamese")
def test_export_then_reload_gives_the_same_predictions(siamese_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(siamese_run, run)
    out = dist_share("export", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (run / "export" / "saved_model" / "saved_model.pb").is_file()
    assert (run / "export" / "model.keras").is_file()
    result = tmp_path / "check.json"
    run_job(
        [sys.executable, str(WORKERS / "cli_export_check.py"), str(run), str(result)], timeout=240
    ).check()
    r = json.loads(result.read_text())
    assert r["shape"] == [32] and r["step"] == 3
    assert r["saved_model_diff"] < 1e-5 and r["keras_diff"] < 1e-5
    assert r["untrained_diff"] > 1e-4  # the comparison would notice a model that lost its weights


@pytest.mark.slow
@pytest.mark.background("cli/bad_norm")
def test_a_config_error_found_while_building_the_model_removes_the_new_run_dir() -> None:
    run, out = background.result("cli/bad_norm")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "model.tower.block.norm" in out.stderr
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.background("cli/mirrored")
def test_default_config_trains_under_mirrored_on_two_cpu_devices() -> None:
    run, job = background.result("cli/mirrored")
    assert "final eval (step 3)" in job.check().output
    _check_run(run, CONFIGS / "siamese_digits.yaml", MIRRORED, "mirrored")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.background("cli/horovod_launch")
def test_default_config_trains_under_horovodrun_gloo_via_launch() -> None:
    run, job = background.result("cli/horovod_launch")
    assert job.check().output.count("final eval (step 3)") == 1  # only the chief reports
    _check_run(run, CONFIGS / "siamese_digits.yaml", [], "horovod")
