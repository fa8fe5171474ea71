"""Project-wide pytest setup: 8 CPU host devices, so the device-mesh tests (tests/jax_mesh) have a mesh.

XLA reads ``XLA_FLAGS`` once, when jax initialises its backends, so the flag is set here, before any test module
(or doctest) imports jax. An explicit device count already in ``XLA_FLAGS`` is left alone.
"""

import os

_COUNT_FLAG = "--xla_force_host_platform_device_count"

if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COUNT_FLAG}=8".strip()


# -- CI: a skipped test is a failure ------------------------------------------------------------------------------
# Most oracles (PEFT, torch, transformers, the console script) are reached through importorskip/skipif, so a broken
# install would quietly drop whole modules and the run would still pass. With CI=true every skip -- of a test or of
# a whole module at collection -- is reported as a failure naming its reason; xfail keeps its meaning.

import pytest  # noqa: E402

_TRUE = {"1", "true", "yes", "on"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in _TRUE


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        path, line, message = longrepr
        return f"{message} ({path}:{line})"
    return str(longrepr)


def _fail_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{what} was skipped, and CI=true makes a skip a failure (a missing package or file would "
                       f"otherwise drop tests silently): {_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report, f"test {item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped:
        _fail_skip(report, f"collection of {collector.nodeid or collector.path}")
