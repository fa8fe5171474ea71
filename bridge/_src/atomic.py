"""Writing a folder so that readers see the old one or the new one, never a half-written mix.

Every writer of this project (PEFT adapters, merged models, converted adapters, Orbax adapter checkpoints) writes
into a fresh temporary sibling of its destination -- same parent, so same filesystem and renames are atomic --
and moves it into place only once it is complete:

* ``temporary_sibling``: the one routine that creates such a folder (``.<name>.tmp-<token>``). It is made with
  ``os.mkdir``, so it gets the permissions any new folder gets under the process's umask (``tempfile.mkdtemp``'s
  ``0700`` would survive into the destination);
* ``replace_directory``: the finished folder takes the destination's place, replacing an existing one;
* ``atomic_directory``: a context manager doing both, and removing the temporary folder when the block fails;
* ``write_text_atomically``: the same for one file (``adapter_config.json``); ``give_normal_mode`` for files
  written by libraries that create them ``0600`` (``safetensors``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

_ATTEMPTS = 100


def temporary_path(target: PathLike, token: str, kind: str = "tmp") -> str:
    """The path ``temporary_sibling(target, token=token, kind=kind)`` creates (nothing is created here).

    Example:
        >>> os.path.basename(temporary_path("/data/adapter", "00ff"))
        '.adapter.tmp-00ff'
    """
    target = os.path.abspath(os.fspath(target))
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{kind}-{token}")


def temporary_sibling(target: PathLike, *, token: Optional[str] = None, kind: str = "tmp") -> str:
    """Create a new empty hidden folder next to ``target`` (creating the parent if needed) and return its path.

    The folder has the permissions of a plain ``os.mkdir`` under the current umask. Without ``token`` a random one
    is drawn (and redrawn should the name exist); with ``token`` (several processes agreeing on one folder) the
    name is fixed and an existing folder of that name raises ``FileExistsError``.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> folder = temporary_sibling(os.path.join(parent, "out"))
        >>> os.path.basename(folder).startswith(".out.tmp-"), os.listdir(folder)
        (True, [])
    """
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if token is not None:
        path = temporary_path(target, token, kind)
        os.mkdir(path)
        return path
    for _ in range(_ATTEMPTS):
        path = temporary_path(target, secrets.token_hex(4), kind)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name next to {target} after {_ATTEMPTS} attempts")


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible, so that it is never changed, even briefly).

    Example:
        >>> 0 <= current_umask() <= 0o777
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_mode(path: PathLike) -> None:
    """Give a file the permissions ``open()`` would under the umask; for files a library creates ``0600``
    (``safetensors`` writes through a private temporary file).

    Example:
        >>> import stat, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "f")
        >>> os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        >>> give_normal_mode(path)
        >>> stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~current_umask()
        True
    """
    os.chmod(path, 0o666 & ~current_umask())


def write_text_atomically(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling file renamed over it (``os.replace``), so a
    reader sees the old file or the new one. The file gets ``open()``'s permissions under the umask.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
        >>> write_text_atomically(path, "{}")
        >>> open(path).read(), sorted(os.listdir(os.path.dirname(path)))
        ('{}', ['a.json'])
    """
    path = os.path.abspath(os.fspath(path))
    for _ in range(_ATTEMPTS):
        temporary = temporary_path(path, secrets.token_hex(4))
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"no free temporary name next to {path} after {_ATTEMPTS} attempts")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def replace_directory(temporary: str, target: str) -> None:
    """Move the finished ``temporary`` folder to ``target``, replacing any existing ``target``.

    ``temporary`` must be a sibling of ``target`` (same filesystem, so renames are atomic). An existing ``target``
    first steps aside under a hidden name, the new folder takes its name, and only then is the old one deleted; if
    the second rename fails the old folder is put back.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> new = temporary_sibling(os.path.join(parent, "out"))
        >>> replace_directory(new, os.path.join(parent, "out"))
        >>> os.listdir(parent)
        ['out']
    """
    if not os.path.exists(target):
        os.rename(temporary, target)
        return
    old = temporary_sibling(target, kind="old")  # reserves a free name
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(temporary, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: PathLike, *, merge: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of ``directory``; when the block succeeds, put it in place.

    If ``directory`` does not exist the temporary folder is renamed onto it (one atomic step). If it exists, it is
    replaced as a whole (``replace_directory``), or with ``merge=True`` each entry of the new folder is moved into
    it with ``os.replace`` (atomic per file, sub-folders merged the same way, other entries left alone: a PEFT
    folder keeps its other adapters). When the block raises, nothing is moved and the temporary folder is removed.

    Example:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> with atomic_directory(target) as tmp:
        ...     _ = open(os.path.join(tmp, "x.txt"), "w").write("hi")
        >>> os.listdir(target)
        ['x.txt']
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file, not a directory")
    temporary = temporary_sibling(directory)
    try:
        yield temporary
        if merge and os.path.isdir(directory):
            _move_into(temporary, directory)
        else:
            replace_directory(temporary, directory)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)


def _move_into(source: str, destination: str) -> None:
    for entry in sorted(os.listdir(source)):
        src, dst = os.path.join(source, entry), os.path.join(destination, entry)
        if os.path.isdir(src):
            if os.path.isdir(dst):
                _move_into(src, dst)
            else:
                if os.path.exists(dst):
                    os.remove(dst)
                os.rename(src, dst)
        else:
            os.replace(src, dst)
