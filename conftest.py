"""Project-wide pytest setup: 8 CPU host devices, so the device-mesh tests (tests/jax_mesh) have a mesh.

XLA reads ``XLA_FLAGS`` once, when jax initialises its backends, so the flag is set here, before any test module
(or doctest) imports jax. An explicit device count already in ``XLA_FLAGS`` is left alone.
"""

import os

_COUNT_FLAG = "--xla_force_host_platform_device_count"

if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COUNT_FLAG}=8".strip()
