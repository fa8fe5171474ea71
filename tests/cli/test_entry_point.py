"""The installed console script and `python -m bridge._src.cli`, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "fourierft")


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, **kwargs)


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="the fourierft console script is not installed")
def test_console_script_inspect_merge_and_error(bert_cls, tmp_path):
    result = run([SCRIPT, "inspect", bert_cls.adapter, "--base", bert_cls.base, "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapters"][0]["totals"]["layers"] == 11
    out = tmp_path / "merged"
    result = run([SCRIPT, "merge", "--base", bert_cls.base, "--adapter", bert_cls.adapter, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "merged 11 layer(s)" in result.stdout and (out / "model.safetensors").is_file()
    result = run([SCRIPT, "merge", "--base", bert_cls.base, "--adapter", bert_cls.adapter, "--out", str(out)])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "already exists" in result.stderr


def test_python_m_and_help():
    for argv in ([], ["inspect"], ["merge"], ["plot"]):
        result = run([sys.executable, "-m", "bridge._src.cli", *argv, "--help"])
        assert result.returncode == 0, result.stderr
        assert "usage: fourierft" in result.stdout
    result = run([sys.executable, "-m", "bridge._src.cli", "inspect", "/no/such/dir"])
    assert result.returncode == 2 and "no such file or directory" in result.stderr and "Traceback" not in result.stderr


def test_no_framework_imports():
    code = ("import sys, bridge._src.cli, bridge._src.merge, bridge._src.summary, bridge._src.plot, "
            "bridge._src.folders, bridge._src.tensor_io; "
            "bad = [m for m in ('torch', 'jax', 'peft', 'transformers', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
