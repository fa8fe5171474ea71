import os
import sys

import jax
import pytest

# The shared mesh helpers live next to the tests; importlib mode does not put this folder on sys.path.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _eight_devices():
    # The root conftest.py forces 8 CPU host devices; without them these tests would test nothing, so fail.
    assert jax.device_count() >= 8, (
        f"tests/jax_mesh needs 8 devices, found {jax.device_count()}: run pytest from the repository root (its "
        "conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8) or set XLA_FLAGS yourself"
    )
