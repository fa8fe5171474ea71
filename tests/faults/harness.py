"""Fault injection for the writers: count every file operation of a write and SIGKILL the process right after
the N-th one.

``install(n)`` wraps, in the current (child) process only, the operations a write can change the disk with:
``os.rename/replace/mkdir/makedirs/remove/unlink/rmdir/link/symlink/chmod``, ``shutil.rmtree/copy*/move``,
``renameat2`` (``bridge._src.atomic._renameat2``) and the close of every file opened for writing through
``open``/``io.open``/``os.fdopen``. Operations done by native code (the ``safetensors`` and ``tensorstore``
writers) are not seen one by one, but the closing of the files they write happens before the next Python-level
operation, which is a kill point. Threads (Orbax writes from a pool) share the one counter.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import threading
from typing import Any, Callable

_lock = threading.Lock()
_state = {"count": 0, "kill_at": 0}

OS_OPERATIONS = ("rename", "replace", "mkdir", "makedirs", "remove", "unlink", "rmdir", "link", "symlink", "chmod")
SHUTIL_OPERATIONS = ("rmtree", "copy", "copy2", "copyfile", "copytree", "move")


def count() -> int:
    """How many operations the write did so far."""
    return _state["count"]


def _tick() -> None:
    with _lock:
        _state["count"] += 1
        if _state["count"] == _state["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)


def _counted(function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        _tick()
        return result

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


class _WrittenFile:
    """A file opened for writing whose close is an operation (once, however it is closed)."""

    def __init__(self, stream: Any) -> None:
        object.__setattr__(self, "_stream", stream)
        object.__setattr__(self, "_ticked", False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._stream, name, value)

    def __iter__(self):
        return iter(self._stream)

    def __enter__(self) -> "_WrittenFile":
        self._stream.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        result = self._stream.__exit__(*exc)
        self._closed()
        return result

    def close(self) -> None:
        self._stream.close()
        self._closed()

    def _closed(self) -> None:
        if not self._ticked:
            object.__setattr__(self, "_ticked", True)
            _tick()


def _opening(function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = function(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+"):
            return _WrittenFile(stream)
        return stream

    return wrapper


def install(kill_at: int) -> None:
    """From now on, count file operations in this process and SIGKILL it right after the ``kill_at``-th
    (``0``: count only)."""
    from bridge._src import atomic

    _state.update(count=0, kill_at=kill_at)
    for name in OS_OPERATIONS:
        setattr(os, name, _counted(getattr(os, name)))
    for name in SHUTIL_OPERATIONS:
        setattr(shutil, name, _counted(getattr(shutil, name)))
    builtins.open = _opening(builtins.open)
    io.open = builtins.open
    os.fdopen = _opening(os.fdopen)
    if atomic._renameat2 is not None:
        atomic._renameat2 = _counted(atomic._renameat2)


def install_done() -> None:
    """Stop killing (the write is over; the count stays readable)."""
    _state["kill_at"] = 0


def force_fallback() -> None:
    """As on a system without ``renameat2(RENAME_EXCHANGE)``: ``replace_directory`` takes its two renames."""
    from bridge._src import atomic

    atomic._renameat2 = None
