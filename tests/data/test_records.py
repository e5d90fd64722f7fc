"""TFRecord shards: round trip, atomic writing, per-worker sharding, exact resume, bad shards.

The multi-process tests start one real job per launcher (horovodrun -np 2, MultiWorkerMirrored
as two local processes); the worker checks a 4-shard set (sharding by file) and a 3-shard set
(the fallback: sharding by example) in the same launch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dist_share.data.records import source as records_source
from dist_share.data.records import writer as records_writer
from dist_share.data.records.manifest import Manifest
from dist_share.data.records.source import RecordSource
from dist_share.data.records.writer import write_shards
from dist_share.errors import ConfigError, DataError
from dist_share.run.inputs import load_arrays, stream_shapes
from dist_share.run.resolve import load_config
from tests.helpers import train_jobs
from tests.helpers.paths import CONFIGS
from tests.workers.train_common import id_split

CONFIG = str(CONFIGS / "siamese_digits.yaml")


def read_ids(dataset: tf.data.Dataset) -> list[int]:
    return [int(i) for features, _ in dataset for i in features["id"].numpy()]


def write(directory: Path, n: int = 99, shards: int = 4, **kwargs) -> Manifest:
    return write_shards(
        directory, {"train": id_split(n)}, shards, family="siamese", progress=False, **kwargs
    )


# -- round trip --------------------------------------------------------------------------------
def test_round_trip_values_labels_and_order_within_each_shard(tmp_path: Path) -> None:
    train, evals = id_split(99), id_split(10, seed=1)
    manifest = write_shards(
        tmp_path, {"train": train, "eval": evals}, {"train": 4, "eval": 2}, family="siamese",
        source={"kind": "test"}, progress=False,
    )  # fmt: skip
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["family"] == "siamese" and saved["examples"] == {"eval": 10, "train": 99}
    assert saved["streams"]["left"] == {"shape": [8, 8, 1], "dtype": "float32"}
    assert saved["streams"]["id"] == {"shape": [], "dtype": "int32"}
    assert saved["streams"]["mask"] == {"shape": [3], "dtype": "bool"}
    assert saved["label"] == {"shape": [], "dtype": "float32"} and saved["source"] == {
        "kind": "test"
    }
    assert [(s.file, s.examples, s.first_example) for s in manifest.shards] == [
        ("train-00000-of-00004.tfrecord", 25, 0),
        ("train-00001-of-00004.tfrecord", 25, 25),
        ("train-00002-of-00004.tfrecord", 25, 50),
        ("train-00003-of-00004.tfrecord", 24, 75),
        ("eval-00000-of-00002.tfrecord", 5, 0),
        ("eval-00001-of-00002.tfrecord", 5, 5),
    ]
    assert all(s.bytes == (tmp_path / s.file).stat().st_size for s in manifest.shards)
    # Nothing but the shards and the manifest: no temporary file left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [s.file for s in manifest.shards] + ["manifest.json"]
    )

    # Each shard alone, read back in order: exactly the source's contiguous slice.
    for info in manifest.shards:
        src = train if info.split == "train" else evals
        one = RecordSource.open(tmp_path / info.file)
        got = list(one.dataset_fn(7, training=False)(None).unbatch().as_numpy_iterator())
        lo = info.first_example
        assert len(got) == info.examples
        for k, (features, label) in enumerate(got):
            for name in src[0]:
                np.testing.assert_array_equal(features[name], src[0][name][lo + k])
                assert features[name].dtype == src[0][name].dtype
            assert label == src[1][lo + k]

    # All train shards through the interleaved pipeline: every example once, shard order kept.
    source = RecordSource.open(str(tmp_path / "train-*.tfrecord"))
    ids = read_ids(source.dataset_fn(16, training=False)(None))
    assert sorted(ids) == list(range(99))
    for info in manifest.shards[:4]:
        mine = [i for i in ids if info.first_example <= i < info.first_example + info.examples]
        assert mine == sorted(mine)
    # A directory names its manifest's shards of one split.
    assert RecordSource.open(tmp_path, split="eval").num_examples == 10
    assert source.input_specs()["mask"] == tf.TensorSpec([3], tf.bool, name="mask")


def test_writes_atomically_and_never_leaves_a_half_written_shard(
    tmp_path: Path, monkeypatch
) -> None:
    real = records_writer._to_lists
    calls = {"n": 0}

    def fail_in_third_shard(array, spec):
        calls["n"] += 1
        if calls["n"] > 2 * 5:  # 5 conversions (4 streams + labels) per shard
            raise OSError("disk full (simulated)")
        return real(array, spec)

    monkeypatch.setattr(records_writer, "_to_lists", fail_in_third_shard)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "out")
    # Two complete shards under their final names, no partial file, no manifest: not a data set.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train-00000-of-00004.tfrecord",
        "train-00001-of-00004.tfrecord",
    ]
    with pytest.raises(DataError, match="no manifest.json beside it"):
        RecordSource.open(str(tmp_path / "out" / "*.tfrecord"))
    monkeypatch.setattr(records_writer, "_to_lists", real)

    write(tmp_path / "ok", shards=4)
    with pytest.raises(DataError, match="already holds a converted data set"):
        write(tmp_path / "ok", shards=2)
    write(tmp_path / "ok", shards=2, overwrite=True)  # the 4-shard files are removed
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "manifest.json",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]


def test_gzip_compression_round_trips(tmp_path: Path) -> None:
    write(tmp_path, n=20, shards=2, compression="GZIP")
    source = RecordSource.open(tmp_path, split="train")
    assert source.manifest.compression == "GZIP"
    assert sorted(read_ids(source.dataset_fn(4, training=False)(None))) == list(range(20))
    assert source.validate() == 20


def test_rejects_what_a_tf_train_example_cannot_hold(tmp_path: Path) -> None:
    features, labels = id_split(4)
    with pytest.raises(DataError, match="stream 'left'.*float64.*cast float64 to float32"):
        write_shards(
            tmp_path,
            {"train": ({**features, "left": features["left"].astype(np.float64)}, labels)},
            1,
        )
    with pytest.raises(DataError, match="stream 'right' has 3 examples but the labels have 4"):
        write_shards(tmp_path, {"train": ({**features, "right": features["right"][:3]}, labels)}, 1)
    with pytest.raises(DataError, match="5 shards for 4 examples"):
        write_shards(tmp_path, {"train": (features, labels)}, 5)
    with pytest.raises(DataError, match="'label' .* reserved"):
        write_shards(tmp_path, {"train": ({"label": labels}, labels)}, 1)


# -- sharding and resume (in one process: InputContexts built by hand) ---------------------------
@pytest.mark.parametrize("pipelines", [2, 3, 5])
def test_every_example_once_per_epoch_across_pipelines(tmp_path: Path, pipelines, caplog) -> None:
    write(tmp_path, n=99, shards=4)
    source = RecordSource.open(tmp_path, split="train")
    records_source._logged_once.clear()
    seen, evaluated, files = [], [], []
    with caplog.at_level(logging.WARNING, logger="dist_share.data.records"):
        for i in range(pipelines):
            ctx = tf.distribute.InputContext(pipelines, i, pipelines)
            plan = source.plan(ctx)
            files.append(set(plan.files))
            stream = source.dataset_fn(pipelines, training=True, seed=5)(ctx)
            two_epochs = read_ids(stream.take(2 * plan.epoch_examples))
            seen.append(two_epochs[: plan.epoch_examples])
            seen.append(two_epochs[plan.epoch_examples :])
            evaluated += read_ids(source.dataset_fn(8 * pipelines, training=False)(ctx))
    # Each epoch: no example twice, none missing, across the pipelines.
    assert sorted(sum(seen[0::2], [])) == list(range(99))
    assert sorted(sum(seen[1::2], [])) == list(range(99))
    assert sorted(evaluated) == list(range(99))
    fallback = [r for r in caplog.records if "sharding by example" in r.getMessage()]
    if pipelines == 2:  # by file: disjoint file sets, each read by its pipeline only
        assert not fallback
        assert sum(len(f) for f in files) == 4 and set().union(*files) == {0, 1, 2, 3}
    else:  # 3: the files split 2/1/1 (uneven); 5: fewer files than pipelines. Said once.
        assert len(fallback) == 1, [r.getMessage() for r in caplog.records]
        assert f"Convert into a multiple of {pipelines} shards" in fallback[0].getMessage()
        assert all(f == {0, 1, 2, 3} for f in files)


def test_training_stream_reshuffles_each_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    tf.random.set_seed(0)  # as the trainer does with training.seed 0 (a tf.data corner case)
    write(tmp_path, n=99, shards=4)
    source = RecordSource.open(tmp_path, split="train")
    for pipelines, replicas in ((2, 2), (1, 2)):  # Horovod or multi-worker; Mirrored on one host
        for i in range(pipelines):
            ctx = tf.distribute.InputContext(pipelines, i, replicas)
            fn = source.dataset_fn(6, training=True, seed=3)
            full = [b[0]["id"].numpy() for b in fn(ctx).take(80)]
            epoch = source.plan(ctx).epoch_examples
            flat = np.concatenate(full)
            first, second = flat[:epoch], flat[epoch : 2 * epoch]
            assert sorted(first) == sorted(second) and not np.array_equal(first, second)
            per_step = replicas // pipelines  # batches one pipeline yields per step
            for start in (1, 9, 17):  # inside the first epoch, in the second, in the third
                resumed = source.dataset_fn(6, training=True, seed=3, start_step=start)(ctx)
                got = [b[0]["id"].numpy() for b in resumed.take(80 - start * per_step)]
                np.testing.assert_array_equal(
                    np.concatenate(got), np.concatenate(full[start * per_step :])
                )
    other = np.concatenate(
        [b[0]["id"].numpy() for b in source.dataset_fn(6, training=True, seed=4)(None).take(5)]
    )
    assert not np.array_equal(other, np.concatenate(full[:5]))  # the seed matters


# -- bad shards --------------------------------------------------------------------------------
def encode(values: dict, label: float = 0.0, shapes: dict | None = None) -> bytes:
    """A hand-made record: {stream: (list kind, values)}; shapes as stored in `<stream>/shape`."""
    ex = tf.train.Example()
    for name, (kind, vals) in values.items():
        getattr(ex.features.feature[name], kind).value[:] = list(vals)
    for name, shape in (shapes or {}).items():
        ex.features.feature[name + "/shape"].int64_list.value[:] = shape
    ex.features.feature["label"].float_list.value[:] = [label]
    return ex.SerializeToString()


def good_record(i: int = 0, **override) -> dict:
    values = {
        "left": ("float_list", [0.5] * 64),
        "right": ("float_list", [0.25] * 64),
        "id": ("int64_list", [i]),
        "mask": ("int64_list", [1, 0, 1]),
    }
    values.update(override)
    return values


SHAPES = {"left": [8, 8, 1], "right": [8, 8, 1], "mask": [3]}


def replace_shard(directory: Path, index: int, payloads: list[bytes]) -> Path:
    """Rewrite shard `index` with `payloads` and record its new size and count in the manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["shards"][index]
    path = directory / entry["file"]
    with tf.io.TFRecordWriter(str(path)) as w:
        for p in payloads:
            w.write(p)
    entry["bytes"], entry["examples"] = path.stat().st_size, len(payloads)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return path


def stream_all(directory: Path) -> None:
    source = RecordSource.open(directory, split="train")
    with source.errors_as_data_errors():
        for _ in source.dataset_fn(8, training=False)(None):
            pass


def assert_clean(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    assert "function_node" not in text and "[[" not in text and len(text) < 400, text


def test_truncated_shard_is_named_when_the_source_is_opened(tmp_path: Path) -> None:
    write(tmp_path)
    path = tmp_path / "train-00002-of-00004.tfrecord"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(err, str(path), f"{size - 100} bytes", f"records {size}", "truncated")


def test_truncated_or_corrupted_shard_is_named_while_streaming(tmp_path: Path) -> None:
    # The manifest agrees with the damaged files' sizes: only streaming can notice.
    write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    path = tmp_path / manifest["shards"][1]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    manifest["shards"][1]["bytes"] = len(data) - 100
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(err, str(path), "truncated record", "convert the data again")

    path.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # one flipped bit
    manifest["shards"][1]["bytes"] = len(data)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(err, str(path), "corrupted record")


def test_record_with_a_wrong_shape_names_file_record_and_stream(tmp_path: Path) -> None:
    write(tmp_path)
    good = [encode(good_record(i), shapes=SHAPES) for i in range(5)]
    # Wrong number of values (a 7x7 image).
    bad = encode(good_record(left=("float_list", [0.5] * 49)), shapes={**SHAPES, "left": [7, 7, 1]})
    path = replace_shard(tmp_path, 2, [*good[:3], bad, *good[3:]])
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(
        err, f"{path}, record 3", "stream 'left'", "expected shape [8, 8, 1]", "found [7, 7, 1]"
    )

    # Right number of values, wrong shape: only the stored shape tells, checked in the graph.
    bad = encode(good_record(), shapes={**SHAPES, "right": [4, 4, 4]})
    path = replace_shard(tmp_path, 2, [*good[:4], bad])
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(
        err, f"{path}, record 4", "stream 'right'", "expected shape [8, 8, 1]", "found [4, 4, 4]"
    )

    # A stream of the wrong type (integers where the manifest says float32).
    bad = encode(good_record(right=("int64_list", [1] * 64)), shapes=SHAPES)
    path = replace_shard(tmp_path, 2, [*good[:1], bad])
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(err, f"{path}, record 1", "stream 'right'", "expected float32", "found int64_list")


def test_record_with_a_missing_stream_names_file_record_and_stream(tmp_path: Path) -> None:
    write(tmp_path)
    good = [encode(good_record(i), shapes=SHAPES) for i in range(3)]
    values = good_record()
    del values["right"]
    bad = encode(values, shapes={k: v for k, v in SHAPES.items() if k != "right"})
    path = replace_shard(tmp_path, 3, [*good, bad])
    with pytest.raises(DataError) as err:
        stream_all(tmp_path)
    assert_clean(err, f"{path}, record 3", "stream 'right' is missing")

    # In the first record, the check when the source is opened finds it.
    path = replace_shard(tmp_path, 3, [bad, *good])
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(
        err, f"{path}, record 0", "stream 'right' is missing", "['id', 'label', 'left', 'mask']"
    )


def test_manifest_that_disagrees_with_the_records(tmp_path: Path) -> None:
    write(tmp_path)
    original = (tmp_path / "manifest.json").read_text()
    first = tmp_path / "train-00000-of-00004.tfrecord"

    def with_manifest(edit) -> None:
        manifest = json.loads(original)
        edit(manifest)
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    with_manifest(lambda m: m["streams"]["left"].update(shape=[4, 4, 4]))
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(
        err, f"{first}, record 0", "stream 'left'", "expected shape [4, 4, 4], found [8, 8, 1]"
    )

    with_manifest(lambda m: m["streams"]["right"].update(dtype="int32"))
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(
        err,
        f"{first}, record 0",
        "stream 'right'",
        "expected int32 values (int64_list), found float_list",
    )

    with_manifest(lambda m: m["streams"].update(extra={"shape": [2], "dtype": "float32"}))
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(err, f"{first}, record 0", "stream 'extra' is missing")

    with_manifest(lambda m: m["streams"].pop("mask"))
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(
        err, f"{first}, record 0", "features ['mask', 'mask/shape'] the manifest does not list"
    )

    with_manifest(lambda m: m["shards"][0].update(examples=20))  # the count: a full pass notices
    source = RecordSource.open(tmp_path, split="train")
    with pytest.raises(DataError) as err:
        source.validate()
    assert_clean(err, str(first), "holds 25 records", "records 20")

    with_manifest(lambda m: m["shards"].pop(3))  # a file the manifest does not list
    with pytest.raises(DataError) as err:
        RecordSource.open(str(tmp_path / "train-*.tfrecord"))
    assert_clean(err, "train-00003-of-00004.tfrecord: not listed in", "manifest.json")

    with_manifest(lambda m: m.update(version=7))
    with pytest.raises(DataError) as err:
        RecordSource.open(tmp_path, split="train")
    assert_clean(err, "manifest.json: version: is 7, this dist_share reads version 1")

    with_manifest(lambda m: None)
    assert RecordSource.open(tmp_path, split="train").validate() == 99
    with pytest.raises(DataError, match="holds siamese data, expected triplet data"):
        RecordSource.open(tmp_path, split="train", family="triplet")
    with pytest.raises(DataError, match="matches no file"):
        RecordSource.open(str(tmp_path / "eval-*.tfrecord"))


# -- multi-process: the real launchers ---------------------------------------------------------
# The workers run records_shards.check inside the session's shared horovodrun and multi-worker
# launches (tests/helpers/train_jobs.py, which writes the shard sets: 99 train examples as 4
# shards, by file, and as 3, by example; 41 eval examples the same ways).
def check_workers(results: list[dict]) -> None:
    for case, expect_by_file in (("4", True), ("3", False)):
        per_worker = [r[case] for r in results]
        assert [w["by_example"] for w in per_worker] == [not expect_by_file] * 2
        train = [w["train_epoch_ids"] for w in per_worker]
        assert sorted(train[0] + train[1]) == list(range(99)), case
        evals = [w["eval_ids"] for w in per_worker]
        assert sorted(evals[0] + evals[1]) == list(range(41)), case
        if expect_by_file:  # each worker read only its own files
            files = [{tuple(f) for f in w["files"]} for w in per_worker]
            assert files[0].isdisjoint(files[1]) and len(files[0] | files[1]) == 4
            for w in per_worker:
                own = {i for lo, n in w["files"] for i in range(lo, lo + n)}
                assert set(w["train_epoch_ids"]) <= own
    for r in results:  # the 3-shard fallback (train and eval sources), each said once
        assert r["fallback_logged"] == 2


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_horovodrun_two_ranks_read_every_example_once() -> None:
    check_workers(train_jobs.check("horovod_gloo", "records"))


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_multiworker_two_processes_read_every_example_once() -> None:
    check_workers(train_jobs.check("multiworker", "records"))


# -- the tfrecord source through the config, the CLI and the trainer ----------------------------
def cli(*argv: str) -> int:
    from dist_share.cli import main

    return main(list(argv))


SMALL = ["--set", "data.train_examples=512", "--set", "data.eval_examples=96"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The default Siamese digits data (512 train / 96 eval pairs) via `dist-share data convert`."""
    out = tmp_path_factory.mktemp("converted") / "siamese_digits"
    assert (
        cli(
            "data",
            "convert",
            CONFIG,
            "--out",
            str(out),
            "--shards",
            "4",
            *SMALL,
        )
        == 0
    )
    return out


def test_convert_writes_the_config_source_exactly(converted: Path) -> None:

    cfg = load_config(CONFIG, [s for s in SMALL if s != "--set"])
    manifest = Manifest.load(converted / "manifest.json")
    assert manifest.family == "siamese" and list(manifest.streams) == ["left", "right"]
    assert manifest.source["source"] == "digits" and manifest.examples("train") == 512
    for split in ("train", "eval"):
        features, labels = load_arrays(cfg.data, split)
        for info in (s for s in manifest.shards if s.split == split):
            one = RecordSource.open(converted / info.file)
            got = list(one.dataset_fn(64, training=False)(None).unbatch().as_numpy_iterator())
            lo = info.first_example
            for k, (feats, label) in enumerate(got):  # values, labels and order within a shard
                np.testing.assert_array_equal(feats["left"], features["left"][lo + k])
                np.testing.assert_array_equal(feats["right"], features["right"][lo + k])
                assert label == labels[lo + k]
            assert len(got) == info.examples


def test_train_from_shards_and_resume_exactly(converted: Path, tmp_path: Path) -> None:
    """Train 8 steps straight vs 4 + resume 4: the same variables (exact data position)."""
    common = [
        "--set", "data.source=tfrecord", "--set", f"data.tfrecord.train={converted}",
        "--set", "training.batch_size=32", "--set", "training.log_every=2",
        "--set", "training.eval_every=4", "--set", "checkpoint.every=4",
        "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir, steps in ((straight, 8), (resumed, 4), (resumed, 8)):
        assert cli("train", CONFIG, "--run-dir", str(run_dir), "--steps", str(steps), *common) == 0
    a = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(straight / "checkpoints")))
    b = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(resumed / "checkpoints")))
    names = [n for n in a.get_variable_to_shape_map() if "model" in n and "OPTIMIZER" not in n]
    assert names
    for n in names:
        np.testing.assert_allclose(
            a.get_tensor(n), b.get_tensor(n), rtol=1e-5, atol=1e-6, err_msg=n
        )


def test_config_and_cli_errors_name_the_key_the_file_and_the_stream(
    converted: Path, tmp_path: Path, capsys
) -> None:

    def cfg(*sets: str):
        return load_config(CONFIG, ["data.source=tfrecord", *sets])

    with pytest.raises(ConfigError, match="data.tfrecord.train: is required for source: tfrecord"):
        cfg()
    with pytest.raises(
        ConfigError,
        match="data.tfrecord.train: 'nowhere' does not exist; write the shards first, e.g. `dist-share data convert",
    ):
        stream_shapes(cfg("data.tfrecord.train=nowhere").data)
    triplet = load_config(
        str(CONFIGS / "triplet_digits.yaml"),
        ["data.source=tfrecord", f"data.tfrecord.train={converted}"],
    )
    with pytest.raises(
        DataError, match=r"data.tfrecord.train: .*holds siamese data, expected triplet"
    ):
        stream_shapes(triplet.data)

    # A bad record met while training: exit code 2, one line naming file, record and stream.
    bad_dir = tmp_path / "bad"
    import shutil

    shutil.copytree(converted, bad_dir)
    good = [
        encode(
            {"left": ("float_list", [0.5] * 64), "right": ("float_list", [0.5] * 64)},
            shapes={"left": [8, 8, 1], "right": [8, 8, 1]},
        )
        for _ in range(40)
    ]
    bad = encode({"left": ("float_list", [0.5] * 64)}, shapes={"left": [8, 8, 1]})
    path = replace_shard(bad_dir, 1, [*good, bad, *good])
    run_dir = tmp_path / "run"
    rc = cli(
        "train", CONFIG, "--run-dir", str(run_dir), "--steps", "20",
        "--set", "data.source=tfrecord", "--set", f"data.tfrecord.train={bad_dir}",
        "--set", "training.batch_size=32", "--set", "logging.progress_bar=false",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{path}, record 40: stream 'right' is missing" in err
    assert "Traceback" not in err
