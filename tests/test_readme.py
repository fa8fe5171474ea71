"""Every code block and command of README.md runs as written, so the README cannot drift from the code.

Each fenced block is preceded by a marker, ``<!-- readme-test: ... -->``:

- ``new`` starts a chain of blocks run in order in one namespace and one fresh folder, ``continue`` adds the
  block to the chain before it; ``subprocess`` (with ``new``) runs the chain in a fresh Python (a block that must
  set something before jax or keras is first imported);
- ``setup=NAME`` / ``then=NAME``: the stand-ins defined before the block and the check run after it
  (``tests/readme_setups.py``);
- ``not-run=REASON``: a block that is not run; ``NOT_RUN[REASON]`` checks what can be checked of it instead.

``python`` blocks are executed (tracebacks point at README.md's own lines), ``bash`` blocks line by line:
``fourierft ...`` through the CLI's ``main`` in-process, ``python FILE`` with ``runpy``. A failure names the
block's section and line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

import bridge  # before tests/ goes on sys.path: its bridge/ folder of tests must not shadow the package

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_setups  # noqa: E402

assert hasattr(bridge, "FourierFTConfig")

ROOT = readme_setups.ROOT
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!-- readme-test: (.*?) -->\s*$")


def readme_blocks() -> list[dict]:
    """Every fenced block: its first code line's number (1-based line of the fence), section, language, code,
    and the fields of the marker on the line above it (``marker`` is None when there is none)."""
    with open(readme_setups.README, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    blocks, heading, i = [], "(top)", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = _FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"README.md line {i + 1}: a code fence is never closed"
            marker = _MARKER.match(lines[i - 1]) if i else None
            fields: dict = {"marker": marker.group(1) if marker else None}
            for word in (marker.group(1).split() if marker else []):
                key, _, value = word.partition("=")
                fields[key] = value or True
            blocks.append({"line": i + 1, "heading": heading, "lang": fence.group(1), "code": "\n".join(
                lines[i + 1:end]), **fields})
            i = end
        i += 1
    return blocks


def chains() -> list[list[dict]]:
    out: list[list[dict]] = []
    for block in readme_blocks():
        if block.get("new"):
            out.append([block])
        elif block.get("continue") and out:
            out[-1].append(block)
    return out


def _chain_id(chain: list[dict]) -> str:
    return f"line{chain[0]['line']}-" + re.sub(r"\W+", "_", chain[0]["heading"]).strip("_")[:40]


def test_every_block_is_run_or_says_why_not():
    known = {"new", "continue", "subprocess", "setup", "then", "not-run", "marker"}
    problems = []
    previous = None
    for block in readme_blocks():
        where = f"README.md line {block['line']} ({block['heading']})"
        kinds = [k for k in ("new", "continue", "not-run") if k in block]
        if block["marker"] is None:
            problems.append(f"{where}: no <!-- readme-test: ... --> marker on the line above the block")
            previous = None
            continue
        if len(kinds) != 1:
            problems.append(f"{where}: the marker needs exactly one of new / continue / not-run=REASON, got {kinds}")
        unknown = set(block) - known - {"line", "heading", "lang", "code"}
        if unknown:
            problems.append(f"{where}: unknown marker field(s) {sorted(unknown)}")
        if block.get("continue") and previous is None:
            problems.append(f"{where}: 'continue' but the block before it does not run")
        if block.get("setup") and block["setup"] not in readme_setups.SETUPS:
            problems.append(f"{where}: no stand-in setup {block['setup']!r} in tests/readme_setups.py")
        if block.get("then") and block["then"] not in readme_setups.CHECKS:
            problems.append(f"{where}: no check {block['then']!r} in tests/readme_setups.py")
        if "not-run" in block and block["not-run"] not in NOT_RUN:
            problems.append(f"{where}: not-run reason {block['not-run']!r} is none of {sorted(NOT_RUN)}")
        if block.get("subprocess") and not block.get("new"):
            problems.append(f"{where}: 'subprocess' belongs on the first block of a chain")
        if "not-run" not in block and block["lang"] not in ("python", "bash"):
            problems.append(f"{where}: only python and bash blocks run, this one is {block['lang']!r}")
        previous = None if "not-run" in block else block
    assert not problems, "\n".join(problems)
    assert len(chains()) >= 8  # the parser still finds the README's runnable blocks


@pytest.mark.parametrize("chain", chains(), ids=_chain_id)
def test_readme_chain_runs(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not chain[0].get("subprocess"):
        readme_setups.run_chain(chain)
        return
    spec = tmp_path / "chain.json"
    spec.write_text(json.dumps(chain))
    env = dict(os.environ)
    for name in ("XLA_FLAGS", "KERAS_BACKEND"):  # what the block itself must set, as a new user's shell lacks it
        env.pop(name, None)
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, readme_setups.__file__, str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        failure = [line for line in done.stderr.splitlines() if line.startswith("READMEFAIL")]
        pytest.fail((failure[0] if failure else "the chain's process failed") + "\n" + done.stderr[-4000:])


# -- blocks that are not run, and what is checked of them instead ---------------------------------------------------
def _commands(block: dict) -> list[list[str]]:
    return [words for words in (shlex.split(line, comments=True) for line in block["code"].splitlines()) if words]


def _check_whole_run(block: dict) -> None:
    """``bash scripts/X.sh``: minutes each; they exist, and CI (``.ci/run``) runs the test script."""
    for words in _commands(block):
        assert words[0] == "bash" and re.fullmatch(r"scripts/\w+\.sh", words[1]), words
        assert os.path.isfile(os.path.join(ROOT, words[1])), f"{words[1]} does not exist"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as stream:
        assert "bash scripts/test.sh" in stream.read()


def _check_installs(block: dict) -> None:
    """``pip install`` lines (network): each names the constraints file and extras the project defines."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as stream:
        extras = set(tomllib.load(stream)["project"]["optional-dependencies"])
    for words in _commands(block):
        assert words[:4] == ["pip", "install", "-c", "constraints.txt"] and words[4] == "-e", words
        target = re.fullmatch(r"\.\[([\w,]+)\]", words[5])
        assert target, f"{words[5]!r} is not .[extras]"
        missing = set(target.group(1).split(",")) - extras
        assert not missing, f"pyproject.toml defines no extra {sorted(missing)} (it has {sorted(extras)})"
    assert os.path.isfile(os.path.join(ROOT, "constraints.txt"))


def _check_synopsis(block: dict) -> None:
    """The usage summary (placeholders in capitals): each command and option exists in the CLI's parser."""
    from bridge._src.cli import build_parser

    parser = build_parser()
    commands = {action.dest: action for action in parser._actions if action.dest == "command"}
    subparsers = next(iter(commands.values())).choices if commands else {}
    for line in block["code"].splitlines():
        words = line.split()
        assert words[0] == "fourierft" and words[1] in subparsers, f"{line!r}: no such command"
        known = {option for action in subparsers[words[1]]._actions for option in action.option_strings}
        shown = set(re.findall(r"(--[a-z][a-z-]*)", line))
        assert shown <= known, f"{line!r}: options {sorted(shown - known)} are not in `fourierft {words[1]} --help`"


NOT_RUN = {"whole-run": _check_whole_run, "installs": _check_installs, "synopsis": _check_synopsis}


@pytest.mark.parametrize("block", [b for b in readme_blocks() if "not-run" in b],
                         ids=lambda b: f"line{b['line']}-{b['not-run']}")
def test_not_run_blocks_are_what_they_say(block):
    NOT_RUN[block["not-run"]](block)
