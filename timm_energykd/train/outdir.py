"""The run's output folder, claimed exclusively: timm's layout, never two writers in one folder.

timm writes into ``<output>/<experiment>`` (default name ``<date>-<model>-<img size>``) even when that folder
holds another run, so two runs with one ``--experiment``, two default-named runs started in the same second,
or an ``args.yaml`` reloaded with ``--config`` interleave their summary rows and checkpoints. Here:

- a default-named folder that exists gets timm's ``-1``, ``-2``... suffix (created atomically with mkdir);
- a named folder that already holds a run is only written by ``--resume`` of a checkpoint inside it;
- a lock (``flock`` on the folder, released by the kernel when the process dies, so a killed run can
  resume) stops a second live writer with one line.
"""
import fcntl
import os
from typing import Optional, Tuple

__all__ = ['claim_output_dir', 'RUN_FILES']

RUN_FILES = ('summary.csv', 'last.pth.tar', 'model_best.pth.tar')  # args.yaml alone: a run killed before its first epoch


def _holds_run(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


class _FolderLock:
    """An exclusive ``flock`` on the folder itself (no lock file is left in the run's folder)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ValueError(f'output folder {path} is in use by another run; wait for it or choose another '
                             '--experiment') from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def claim_output_dir(base: str, name: str, named: bool, resume: Optional[str]) -> Tuple[str, bool, '_FolderLock']:
    """Create or reuse ``base/name`` for this run only; returns (path, created, lock file to keep open).

    Args:
        named: the user chose the name (``--experiment``); otherwise it is timm's default name.
        resume: the ``--resume`` path: a run may continue in the folder that holds its checkpoint.
    """
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, name)
    resuming_here = bool(resume) and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(path)
    if named:
        if _holds_run(path) and not resuming_here:
            raise ValueError(f'--experiment {name}: {path} already holds a run; resume it with --resume '
                             f'{os.path.join(path, "last.pth.tar")} or choose another --experiment')
        created = not os.path.exists(path)
        os.makedirs(path, exist_ok=True)
    else:
        candidate, count = path, 0
        while True:  # mkdir is atomic: of two runs started in the same second, one gets the -1 folder
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                count += 1
                if count >= 100:
                    raise ValueError(f'--output {base}: 100 folders named {name}-N exist; choose --experiment')
                candidate = f'{path}-{count}'
        path, created = candidate, True
    lock = _FolderLock(path)
    if not resuming_here and _holds_run(path):  # another run got here between the check and the lock
        lock.close()
        raise ValueError(f'output folder {path} was taken by another run; choose another --experiment')
    return path, created, lock
