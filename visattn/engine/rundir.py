"""One run per folder: an advisory lock with the owner's pid and host, and the checks of what a folder holds
before a run writes into it."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt

try:
    import fcntl
except ImportError:  # Windows: the lock is the file's existence, checked against the owner's pid
    fcntl = None

LOCK_FILE = 'run.lock'
OUTPUTS = (ckpt.MANIFEST, ckpt.LAST_WEIGHTS, ckpt.BEST_WEIGHTS, ckpt.LEGACY_STATE, 'summary.csv', 'summary.png',
           'per_class.csv', 'config.yaml')


class RunFolderError(RuntimeError):
    """A run folder that another process holds, or that holds a run this one would overwrite."""


def _holder(text: str) -> dict[str, Any]:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return 'another process'
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('since', 0)))
    return f'process {owner.get("pid")} on host {owner.get("host")} (since {since})'


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of a run folder: ``run.lock`` holds ``{"pid", "host", "since"}`` of the process that holds it.

    With ``fcntl`` the lock is an advisory ``flock`` on the file, which the system drops when the holder dies, so
    a file left by a killed run is free; without it (or where the file system refuses ``flock``) a file naming a
    pid of this host that no longer runs is stale and taken over.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns the owner of a stale lock taken over (``None`` if there was none).

        Raises:
            RunFolderError: a live process holds the folder.
        """
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.time()}
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            text = os.read(fd, 4096).decode(errors='replace')
            owner = _holder(text)
            if not self._lock(fd, owner, me['host']):
                os.close(fd)
                raise RunFolderError(f'{self.path.parent} is in use by {_describe(owner)}: one run per folder; wait '
                                     f'for it to end or choose another --experiment (if that process is gone, delete '
                                     f'{self.path})')
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd
        return owner if text.strip() else None

    @staticmethod
    def _lock(fd: int, owner: dict[str, Any], host: str) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        return not owner or (owner.get('host') == host and not _alive(owner.get('pid')))

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def prepare(run_dir: Path, *, resume: bool, overwrite: bool, log: Callable[[str], Any] = print) -> RunLock:
    """Lock ``run_dir`` for this run, refuse to overwrite another run's outputs unless asked, and sweep the
    leftovers of interrupted writes. Returns the lock (the caller releases it).

    Raises:
        RunFolderError: the folder is in use, or holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    stale = lock.acquire()
    try:
        if stale is not None:
            log(f'{run_dir}: taking over the lock left by {_describe(stale)}, which is no longer running')
        if not resume:
            _check_unused(run_dir, overwrite, log)
        try:
            gone = ckpt.sweep(run_dir, ckpt.read_manifest(run_dir))
        except ckpt.CheckpointError:
            gone = []  # a corrupt manifest: its files stay for --resume to report on
        if gone:
            log(f'{run_dir}: removed {len(gone)} leftover file(s) of interrupted writes')
    except BaseException:
        lock.release()
        raise
    return lock


def _check_unused(run_dir: Path, overwrite: bool, log: Callable[[str], Any]) -> None:
    held = [name for name in OUTPUTS[:-1] if (run_dir / name).exists()]
    if not held:
        return
    if overwrite:
        for name in OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        ckpt.sweep(run_dir, None)
        log(f'{run_dir}: --overwrite: removed the outputs of the previous run')
        return
    try:
        manifest = ckpt.read_manifest(run_dir)
    except ckpt.CheckpointError:
        manifest = None
    if manifest is not None and manifest['finished']:
        what = f'a finished run ({manifest["epochs"]} epochs)'
        how = ''
    elif manifest is not None:
        what = f'an unfinished run (epoch {manifest["current"]["epoch"] + 1} of {manifest["epochs"]})'
        how = f'continue it with --resume {run_dir}, '
    else:
        what, how = f'the outputs of another run ({", ".join(held)})', ''
    raise RunFolderError(f'{run_dir} already holds {what}: {how}start over with --overwrite, or choose another '
                         f'--experiment')
