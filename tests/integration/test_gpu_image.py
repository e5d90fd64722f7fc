"""The GPU image, built for real with podman (opt-in: DIST_SHARE_GPU_IMAGE_TEST=1).

docker/Dockerfile.gpu on the local debootstrap base: TensorFlow's CUDA wheels (several GB) and
Horovod compiled with NCCL in the builder stage make it too slow for the default suite; CI runs
it with ``DIST_SHARE_GPU_IMAGE_TEST=1 ./bootstrap test tests/integration/test_gpu_image.py``.
No GPU is needed: the image's Horovod must say it was built with NCCL, its TensorFlow must be
the CUDA build, and the GPU check must take its no-GPU path inside it.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.clusters import podman
from tests.helpers.paths import ROOT
from tests.integration.conftest import cpu_build_args

pytestmark = [
    pytest.mark.gpu_image,
    pytest.mark.multiprocess,
    pytest.mark.slow,
    pytest.mark.timeout(5400),
]

TAG = "localhost/dist-share:gpu"


@pytest.fixture(scope="module")
def gpu_image() -> str:
    missing = podman.missing_tools()
    assert not missing, f"the GPU image test needs {missing}"
    podman.ensure_base_image()
    args = cpu_build_args()
    args["build_contexts"].pop("horovod-wheels", None)  # the builder compiles Horovod with NCCL
    podman.build_image(ROOT, "docker/Dockerfile.gpu", TAG, timeout=5000, **args)
    return TAG


def _in_image(image: str, *cmd: str) -> str:
    return podman.run(["podman", "run", "--rm", image, *cmd], timeout=600)


def test_gpu_image_has_tensorflows_cuda_build_and_horovod_with_nccl(gpu_image: str) -> None:
    script = (
        "import json, os, shutil, tensorflow as tf, horovod.tensorflow as hvd;"
        "print(json.dumps({'cuda': tf.test.is_built_with_cuda(),"
        " 'build': tf.sysconfig.get_build_info()['cuda_version'],"
        " 'nccl': int(hvd.nccl_built()), 'gloo': hvd.gloo_built(), 'mpi': hvd.mpi_built(),"
        " 'nvcc': shutil.which('nvcc'),"
        " 'nvidia': [os.environ.get(k) for k in"
        " ('NVIDIA_VISIBLE_DEVICES', 'NVIDIA_DRIVER_CAPABILITIES')]}))"
    )
    out = _in_image(gpu_image, "python", "-c", script)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["cuda"] is True and info["build"].startswith("12.")
    assert info["nccl"] > 0 and info["gloo"] and info["mpi"]
    assert info["nvcc"] is None  # the compiler stayed in the builder stage
    assert info["nvidia"] == ["all", "compute,utility"]


def test_gpu_check_takes_its_no_gpu_path_in_the_image(gpu_image: str) -> None:
    out = _in_image(gpu_image, "python", "-m", "benchmarks.gpu_check", "--out", "/tmp/check.json")
    assert "TensorFlow sees no GPU on this machine; nothing to check" in out


def test_the_opt_in_switch_is_what_selected_this_module() -> None:
    assert os.environ.get("DIST_SHARE_GPU_IMAGE_TEST") == "1"
