"""Replacing a directory so that readers see the old one or the new one, never a half-written mix."""

from __future__ import annotations

import os
import shutil
import tempfile


def replace_directory(temporary: str, target: str) -> None:
    """Move the finished ``temporary`` folder to ``target``, replacing any existing ``target``.

    ``temporary`` must be a sibling of ``target`` (same filesystem, so renames are atomic). An existing ``target``
    first steps aside under a hidden name, the new folder takes its name, and only then is the old one deleted; if
    the second rename fails the old folder is put back.

    Example:
        >>> import os, tempfile
        >>> parent = tempfile.mkdtemp()
        >>> new = tempfile.mkdtemp(dir=parent)
        >>> replace_directory(new, os.path.join(parent, "out"))
        >>> os.listdir(parent)
        ['out']
    """
    if not os.path.exists(target):
        os.rename(temporary, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(os.path.abspath(target)))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(temporary, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
