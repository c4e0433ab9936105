"""Shared test setup: hypothesis profiles and the location of the committed test data.

Profiles: "dev" (quick, the default) and "ci" (derandomised, more examples), chosen by the CI
environment variable. Select one explicitly with ``pytest --hypothesis-profile=ci``.
"""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

DATA_DIR = Path(__file__).resolve().parent / "data"

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def data_dir():
    """``tests/data``: known-answer vectors (``peft/``) and tiny checkpoints (``models/``, ``adapters/``,
    ``expected/``); see tests/data/README.md."""
    return DATA_DIR
