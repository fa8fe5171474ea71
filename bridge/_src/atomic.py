"""Writing a folder so that, at every instant a process can be killed, the destination holds the complete old
content or the complete new content -- never a mix, and never nothing without automatic recovery.

Every writer of this project (PEFT adapters, merged models, converted adapters, Orbax adapter checkpoints)
builds the complete new folder in a fresh temporary sibling of its destination (same parent, so same filesystem)
and then puts it in place with one atomic step:

* ``temporary_sibling``: the one routine that creates such a folder (``.<name>.tmp-<token>``). It is made with
  ``os.mkdir``, so it gets the permissions any new folder gets under the process's umask (``tempfile.mkdtemp``'s
  ``0700`` would survive into the destination);
* ``replace_directory``: the finished folder takes the destination's place. On Linux an existing destination is
  swapped with it by ``renameat2(RENAME_EXCHANGE)`` (``exchange_directories``), one system call; elsewhere, or
  on filesystems without that flag, the old folder is renamed to ``.<name>.old-<token>`` and the new one to the
  destination: a kill between the two renames leaves no destination, which ``recover_directory`` restores;
* ``recover_directory``: called at the start of every write (and meant for the readers of these folders;
  ``fourierft_jax.load_adapter`` calls it): puts a ``.old-*`` copy back when the destination is missing,
  removes stale ``.old-*`` copies, and for writers the ``.<name>.tmp-*`` folders killed writes left behind;
* ``atomic_directory``: a context manager doing all of it, and removing the temporary folder when the block
  fails. With ``merge=True`` (a PEFT folder keeping its other adapters' sub-folders) the temporary folder first
  receives hard links to every entry of the existing destination the new content does not replace, so a
  multi-file update is still one swap;
* ``write_text_atomically``: the same for one file (``adapter_config.json``); ``give_normal_mode`` for files
  written by libraries that create them ``0600`` (``safetensors``).

What is not guaranteed: two writers of one destination at the same time (each one's recovery may delete the
other's temporary folder; the last swap wins); durability across a power cut (nothing is ``fsync``-ed, a kill
of the process is what is covered); and a kill can leave a hidden ``.<name>.tmp-*`` folder (a partial new or a
partly deleted old copy) next to the destination, which the readers skip and the next write removes. Merged
folders share the carried entries' inodes with the replaced folder (hard links): the writers never modify files
in place, so neither copy changes the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from typing import Callable, Iterator, Optional, Union

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


def _load_renameat2() -> Optional[Callable[..., int]]:
    """glibc's ``renameat2`` (Linux 3.15+, glibc 2.28+), or ``None`` where the C library has no such symbol."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# What a kernel or filesystem without the exchange flag answers (tmpfs, ext4, xfs, btrfs have it; some network
# and FUSE filesystems do not): the caller then takes the two-rename path.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange_directories(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); ``False`` where the system
    or the filesystem cannot, with nothing changed. Any other failure raises ``OSError``.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> for name in ("a", "b"):
        ...     os.makedirs(os.path.join(parent, name, name))
        >>> swapped = exchange_directories(os.path.join(parent, "a"), os.path.join(parent, "b"))
        >>> os.listdir(os.path.join(parent, "a")) == (["b"] if swapped else ["a"])
        True
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def _siblings(target: str, kind: str) -> list[str]:
    """The hidden ``.<name>.<kind>-<token>`` entries next to ``target``, sorted; for ``tmp``, also what a write
    nested in such a temporary folder left next to it (``..<name>.tmp-<token>.tmp-<token>``)."""
    parent, name = os.path.split(target)
    if kind == "old":
        pattern = re.compile(re.escape(f".{name}.old-") + "[0-9a-f]+")
    else:
        pattern = re.compile(r"\.+" + re.escape(f"{name}.tmp-") + r"[0-9a-f]+(\.(tmp|old)-[0-9a-f]+)*")
    try:
        entries = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(parent, entry) for entry in sorted(entries) if pattern.fullmatch(entry)]


def recover_directory(target: PathLike, *, writing: bool = False, children: bool = False) -> None:
    """Finish what a writer killed inside ``replace_directory`` left next to ``target``; idempotent and cheap.

    Where the two-rename fallback was killed between its renames, ``target`` is missing and its complete old
    content sits in ``.<name>.old-<token>``: it is renamed back. Where ``target`` exists, stale ``.old-*`` folders
    (a kill while deleting the old content) are removed. With ``writing=True`` (a writer about to write
    ``target``), left-over ``.<name>.tmp-<token>`` folders of killed writes are removed too; readers leave those
    alone, as they may belong to a write in progress. With ``children=True`` the folders inside ``target`` are
    recovered the same way (a PEFT folder whose sub-folder adapters are written on their own). Two ``.old-*`` folders and no ``target`` (only possible with
    concurrent writers) raise ``FileExistsError`` naming them.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> os.makedirs(os.path.join(parent, ".out.old-00ff", "kept"))
        >>> recover_directory(os.path.join(parent, "out"))
        >>> os.listdir(parent), os.listdir(os.path.join(parent, "out"))
        (['out'], ['kept'])
    """
    target = os.path.abspath(os.fspath(target))
    old = _siblings(target, "old")
    if old and not os.path.lexists(target):
        if len(old) > 1:
            raise FileExistsError(f"{target} is missing and several old copies stand next to it ({old}): "
                                  "were two writers running at once? Rename the right one to its place")
        os.rename(old[0], target)
        old = []
    for path in old + (_siblings(target, "tmp") if writing else []):
        _remove(path)
    if children and os.path.isdir(target):
        names = {match.group(1) for match in map(_CHILD.fullmatch, os.listdir(target)) if match}
        for name in sorted(names):
            recover_directory(os.path.join(target, name), writing=writing)


_CHILD = re.compile(r"\.+(.+?)\.(?:tmp|old)-[0-9a-f]+(?:\.(?:tmp|old)-[0-9a-f]+)*")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace_directory(temporary: str, target: str) -> None:
    """Move the finished ``temporary`` folder to ``target``, replacing any existing ``target`` in one step.

    ``temporary`` must be a sibling of ``target`` (same filesystem). A missing ``target`` is a plain rename. An
    existing one is swapped with ``temporary`` atomically (``exchange_directories``), after which ``temporary``
    holds the old content and is deleted. Where the swap is unsupported, the fallback renames ``target`` to
    ``.<name>.old-<token>``, ``temporary`` to ``target``, then deletes the old copy: a kill between the two
    renames leaves no ``target``, which ``recover_directory`` (called first by every writer, and by readers)
    puts back; if
    the second rename fails the old folder is put back at once.

    Example:
        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> for _ in range(2):
        ...     new = temporary_sibling(os.path.join(parent, "out"))
        ...     replace_directory(new, os.path.join(parent, "out"))
        >>> os.listdir(parent)
        ['out']
    """
    if not os.path.lexists(target):
        os.rename(temporary, target)
        return
    # A working directory inside the replaced folder would follow the old inode and be deleted with it
    # (`save_pretrained(".")`): move it to the same path in the new folder.
    inside = _relative_cwd(target)
    if exchange_directories(temporary, target):
        _follow(target, inside)
        _remove(temporary)
        return
    old = temporary_sibling(target, kind="old")  # reserves a free name
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(temporary, target)
    except BaseException:
        os.rename(old, target)
        raise
    _follow(target, inside)
    _remove(old)


def _relative_cwd(target: str) -> Optional[str]:
    """The working directory's path relative to ``target`` when it lies inside ``target``, else ``None``."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    relative = os.path.relpath(cwd, os.path.realpath(target))
    return None if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _follow(target: str, inside: Optional[str]) -> None:
    if inside is not None:
        path = os.path.normpath(os.path.join(target, inside))
        os.chdir(path if os.path.isdir(path) else target)


@contextlib.contextmanager
def atomic_directory(directory: PathLike, *, merge: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of ``directory``; when the block succeeds, put it in place in one step.

    Left-overs of killed writes are first cleared (``recover_directory(..., writing=True)``). A missing
    ``directory`` is created by one rename; an existing one is replaced as a whole (``replace_directory``). With
    ``merge=True`` the entries of the existing ``directory`` that the new content does not replace are first
    hard-linked (copied where links are refused) into the temporary folder, sub-folders merged the same way, so
    a PEFT folder keeps its other adapters and the whole change is still one swap. When the block raises,
    nothing is moved and the temporary folder is removed.

    Example:
        >>> import tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> for name in ("x.txt", "y.txt"):
        ...     with atomic_directory(target, merge=True) as tmp:
        ...         _ = open(os.path.join(tmp, name), "w").write("hi")
        >>> sorted(os.listdir(target))
        ['x.txt', 'y.txt']
    """
    directory = os.path.abspath(os.fspath(directory))
    recover_directory(directory, writing=True)
    if os.path.isfile(directory):
        raise ValueError(f"{directory} is a file, not a directory")
    temporary = temporary_sibling(directory)
    try:
        yield temporary
        if merge and os.path.isdir(directory):
            _link_missing(directory, temporary)
        replace_directory(temporary, directory)
    finally:
        if os.path.lexists(temporary):
            _remove(temporary)


_TEMPORARY = re.compile(r"\..+\.(tmp|old)-[0-9a-f]+")


def _link_missing(source: str, destination: str) -> None:
    """Give ``destination`` every entry of ``source`` it lacks (recursively), as hard links where possible."""
    os.chmod(destination, stat.S_IMODE(os.stat(source).st_mode))  # as when the entries were moved into it
    for entry in sorted(os.listdir(source)):
        src, dst = os.path.join(source, entry), os.path.join(destination, entry)
        if _TEMPORARY.fullmatch(entry):  # a killed write's left-over inside the folder: not carried over
            continue
        if os.path.lexists(dst):
            if os.path.isdir(dst) and not os.path.islink(dst) and os.path.isdir(src) and not os.path.islink(src):
                _link_missing(src, dst)
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.mkdir(dst)
            _link_missing(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:  # filesystems without hard links, or a file protected_hardlinks refuses
                shutil.copy2(src, dst)
