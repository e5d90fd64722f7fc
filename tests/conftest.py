"""Fixtures of every test module: the background jobs a module's tests name."""

from __future__ import annotations

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
