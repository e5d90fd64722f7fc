"""Fixtures of every test module: the background jobs a module's tests name."""

from __future__ import annotations

import os

import pytest

from tests.helpers import background


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml: the container image's dependency layer is keyed
    # on that file, and a test-only change should not rebuild it.
    config.addinivalue_line(
        "markers",
        "background(*keys): the test uses these jobs of its module's background_jobs(), "
        "started when the module begins (tests/helpers/background.py)",
    )
    config.addinivalue_line(
        "markers",
        "gpu_image: builds the GPU image (tests/integration/test_gpu_image.py); collected only "
        "with DIST_SHARE_GPU_IMAGE_TEST=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The GPU image build is opt-in (docs/GPU.md): its tests are deselected, and reported as
    such, unless DIST_SHARE_GPU_IMAGE_TEST=1."""
    if os.environ.get("DIST_SHARE_GPU_IMAGE_TEST") == "1":
        return
    opted_out = [item for item in items if item.get_closest_marker("gpu_image")]
    if opted_out:
        config.hook.pytest_deselected(items=opted_out)
        items[:] = [item for item in items if not item.get_closest_marker("gpu_image")]


@pytest.fixture(scope="module", autouse=True)
def _background_jobs(request: pytest.FixtureRequest, tmp_path_factory) -> None:
    """Start, as the module begins, the background jobs its selected tests name with
    ``pytest.mark.background`` (built by the module's ``background_jobs(root)``)."""
    make = getattr(request.module, "background_jobs", None)
    if make is None:
        return
    keys = [
        key
        for item in request.session.items
        if item.module is request.module
        for marker in item.iter_markers("background")
        for key in marker.args
    ]
    if keys:
        jobs = make(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
        for key in dict.fromkeys(keys):
            background.start(key, jobs[key])
