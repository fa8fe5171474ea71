"""Public API = documented API: each package's ``__all__`` is exactly the list in the README's "API" section.

The README marks one block per package, ``<!-- api:<package> -->`` ... ``<!-- /api -->``, whose list items start
with the name in backticks (``- `name`: what it is``).
"""

from __future__ import annotations

import importlib
import os
import re
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("bridge", "fourierft_torch", "fourierft_jax")
_BLOCK = re.compile(r"<!-- api:(\w+) -->\n(.*?)<!-- /api -->", re.S)
_ITEM = re.compile(r"^- `([A-Za-z_][A-Za-z0-9_]*)`", re.M)


def readme_api() -> dict[str, list[str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        text = stream.read()
    return {package: _ITEM.findall(body) for package, body in _BLOCK.findall(text)}


def test_readme_has_one_block_per_package():
    blocks = [package for package, _ in _BLOCK.findall(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())]
    assert sorted(blocks) == sorted(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_readme_lists_exactly_all(package):
    if package != "bridge":
        pytest.importorskip("torch" if package == "fourierft_torch" else "jax")
    module = importlib.import_module(package)
    documented = readme_api()[package]
    assert len(documented) == len(set(documented)), f"README lists a name of {package} twice"
    assert sorted(documented) == sorted(module.__all__), (
        f"README's API block for {package} and {package}.__all__ differ: "
        f"only in README {sorted(set(documented) - set(module.__all__))}, "
        f"only in __all__ {sorted(set(module.__all__) - set(documented))}"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_what_the_package_exposes(package):
    if package != "bridge":
        pytest.importorskip("torch" if package == "fourierft_torch" else "jax")
    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which it does not define"
    public = {
        name for name, value in vars(module).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and value.__name__.startswith(f"{package}._"))
    }
    assert public == set(module.__all__), f"{package} exposes names outside __all__: {sorted(public - set(module.__all__))}"


@pytest.mark.parametrize("package", PACKAGES)
def test_typed_marker(package):
    assert os.path.isfile(os.path.join(ROOT, package, "py.typed"))
