"""Shared pytest setup of the bridge tests."""


def pytest_configure(config):
    # Registered here so that `-m "not slow"` works; the slow tests still run by default.
    config.addinivalue_line("markers", "slow: a long test (tens of seconds) that runs in the default suite")
