"""The set-up's Horovod build plan for CPU and GPU machines, and its TensorFlow 2.21 patch.

The GPU build itself (Debian's CUDA 12.4 nvcc, TensorFlow's CUDA wheels, about 8 GB) is
docs/GPU.md's recipe and the opt-in GPU image test; here the plan and the patch are checked on
the real Horovod sources, and the patched function is compiled against TF 2.21's headers.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from tests.helpers.paths import ROOT

BOOTSTRAP = str(ROOT / "bootstrap")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_HOME", "HOROVOD_"))}
    return subprocess.run(
        [BOOTSTRAP, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
        check=False,
    )


def _fake_toolkit(root: Path, release: str) -> Path:
    """A directory whose bin/nvcc answers --version like a CUDA toolkit of that release."""
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(
        "#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {release}, V{release}.99'\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


def _plan(text: str) -> dict[str, str]:
    return dict(
        line.strip().split("=", 1) for line in text.splitlines() if line.startswith("  HOROVOD_")
    )


def test_cpu_plan_keeps_its_wheel_key_and_builds_without_gpu_operations(tmp_path: Path) -> None:
    done = _run("plan", DIST_SHARE_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"wheel_cache: {tmp_path}/wheels/horovod-0.28.1-tf2.21.0-cp311\n" in done.stdout
    env = _plan(done.stdout)
    assert env["HOROVOD_WITH_TENSORFLOW"] == "1" and env["HOROVOD_WITH_GLOO"] == "1"
    assert not [k for k in env if "GPU" in k or "CUDA" in k or "NCCL" in k]
    assert "post_install_check: gloo_built mpi_built\n" in done.stdout
    assert "mpi_ops.cc: gpu::AsGpuStreamValue defined" in done.stdout


def test_gpu_plan_builds_nccl_with_a_cuda_12_toolkit(tmp_path: Path) -> None:
    toolkit = _fake_toolkit(tmp_path / "cuda", "12.6")
    done = _run(
        "plan", DIST_SHARE_CACHE=str(tmp_path), DIST_SHARE_TF_EXTRA="gpu", CUDA_HOME=str(toolkit)
    )
    assert done.returncode == 0, done.stderr
    # Its own cache entry: a CPU wheel is never taken for a GPU set-up.
    assert "wheels/horovod-0.28.1-tf2.21.0-cp311-nccl-cuda12.6\n" in done.stdout
    env = _plan(done.stdout)
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert env["HOROVOD_CUDA_HOME"] == str(toolkit)
    assert env["HOROVOD_NCCL_LINK"] == "SHARED"
    assert env["HOROVOD_NCCL_LIB"].endswith("/nccl/lib")  # where libnccl.so -> .so.2 is made
    assert env["HOROVOD_BUILD_CUDA_CC_LIST"] == "60,70,75,80,86,89,90"
    assert "post_install_check: gloo_built mpi_built nccl_built\n" in done.stdout


def test_gpu_plan_falls_back_to_debians_cuda_12_and_refuses_other_majors(
    tmp_path: Path,
) -> None:
    cuda13 = _fake_toolkit(tmp_path / "cuda13", "13.0")
    done = _run(
        "plan", DIST_SHARE_CACHE=str(tmp_path), DIST_SHARE_TF_EXTRA="gpu", CUDA_HOME=str(cuda13)
    )
    assert done.returncode == 1
    assert f"CUDA_HOME={cuda13} holds CUDA 13.0; TensorFlow 2.21 needs a CUDA 12 toolkit" in (
        done.stderr
    )
    # nvcc on PATH of the wrong major is passed over for Debian's 12.4 (unpacked at set-up).
    bin_dir = cuda13 / "bin"
    done = _run(
        "plan",
        DIST_SHARE_CACHE=str(tmp_path),
        DIST_SHARE_TF_EXTRA="gpu",
        PATH=f"{bin_dir}:/usr/bin:/bin",
    )
    assert done.returncode == 0, done.stderr
    assert f"cuda_home: {tmp_path}/cuda/12.4.131 (to be unpacked from Debian trixie's" in (
        done.stdout
    )
    assert "-nccl-cuda12.4\n" in done.stdout
    done = _run("plan", DIST_SHARE_TF_EXTRA="rocm")
    assert done.returncode == 1 and "DIST_SHARE_TF_EXTRA must be cpu or gpu" in done.stderr


def test_a_venv_set_up_for_cpu_is_not_reused_for_gpu(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".dist_share-tf-extra").write_text("cpu\n")
    done = _run(
        "setup",
        DIST_SHARE_VENV=str(venv),
        DIST_SHARE_CACHE=str(tmp_path / "cache"),
        DIST_SHARE_TF_EXTRA="gpu",
        DIST_SHARE_CLUSTER_TESTS="0",
    )
    assert done.returncode == 1
    assert f"{venv} was set up with DIST_SHARE_TF_EXTRA=cpu, not gpu" in done.stderr


@pytest.fixture(scope="module")
def horovod_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("horovod")
    done = _run("horovod-source", str(out))
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def test_the_patch_replaces_the_stream_declaration_tf_2_21_lacks(horovod_sources: Path) -> None:
    text = (horovod_sources / "horovod/tensorflow/mpi_ops.cc").read_text()
    assert "GpuStreamHandle AsGpuStreamValue(Stream* stream);" not in text
    assert text.count("inline GpuStreamHandle AsGpuStreamValue(Stream* stream)") == 1
    # The definition follows the include of the Stream class it uses.
    assert text.index('#include "tensorflow/compiler/xla/stream_executor/stream.h"') < text.index(
        "inline GpuStreamHandle AsGpuStreamValue"
    )
    assert (
        "xla_mpi_ops.cc" not in (horovod_sources / "horovod/tensorflow/CMakeLists.txt").read_text()
    )


def test_the_patched_function_compiles_against_tf_2_21_headers(
    horovod_sources: Path, tmp_path: Path
) -> None:
    """The inserted function, cut from the patched file, with TF's Stream and a stand-in for
    cudaStream_t (a pointer to an opaque struct, as in CUDA's headers)."""
    text = (horovod_sources / "horovod/tensorflow/mpi_ops.cc").read_text()
    start = text.index("namespace stream_executor {\nnamespace gpu {\ninline")
    end = text.index("} // namespace stream_executor\n", start) + len(
        "} // namespace stream_executor\n"
    )
    source = tmp_path / "stream_handle.cc"
    source.write_text(
        '#include "tensorflow/compiler/xla/stream_executor/stream.h"\n'
        "struct CUstream_st;\nusing GpuStreamHandle = CUstream_st*;\n"
        "using stream_executor::Stream;\n" + text[start:end]
    )
    done = subprocess.run(
        ["g++", "-fsyntax-only", *tf.sysconfig.get_compile_flags(), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_gpu_pins_are_the_cuda_libraries_tensorflow_was_built_with() -> None:
    """docker/gpu-constraints.txt pins each of the and-cuda extra's libraries to its lower
    bound (the versions TF 2.21 was built and tested with); tensorflow-cpu carries the same
    metadata."""
    import importlib.metadata as metadata

    wanted = {}
    for requirement in metadata.requires("tensorflow-cpu") or []:
        if 'extra == "and-cuda"' in requirement:
            name, bounds = requirement.split(";")[0].split("<", 1)[0], requirement.split(";")[0]
            wanted[name.strip()] = bounds.split(">=")[1].strip()
    pins = {}
    for line in (ROOT / "docker/gpu-constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert pins == wanted
