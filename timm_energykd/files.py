"""Atomic file writes and safe checkpoint reading.

Every file the trainer writes goes through a temporary file in the same folder followed by ``os.replace``,
so a crash (or a pre-empted job) never leaves a half-written ``args.yaml``, threshold cache or checkpoint
behind: readers see either the old file or the new one. New files get ``0o666 & ~umask`` (0644 with the
usual umask 022), as timm's checkpoints do. A failed write (disk full, read-only file system, quota) raises
``DiskWriteError``: an ``OSError`` whose message is one line naming the file and the disk problem; the temp
file is removed and the previous version of the file stays in place.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles); timm training
checkpoints store ``args`` as an ``argparse.Namespace``, which is allow-listed.
"""
import argparse
import errno
import os
import pickle
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch

__all__ = ['write_atomic', 'save_checkpoint_atomic', 'torch_save_file', 'atomic_output', 'DiskWriteError',
           'default_file_mode', 'default_dir_mode', 'apply_umask',
           'load_checkpoint_file', 'load_state_dict_file', 'check_writable_dir', 'check_image_files',
           'check_regular_file']

PathLike = Union[str, os.PathLike]


class DiskWriteError(OSError):
    """A file could not be written (disk full, read-only file system, quota, permissions...).

    ``str(e)`` is one line that names the file and the disk problem; ``e.errno`` is the underlying errno (e.g.
    ``errno.ENOSPC``) when it is known. The file's previous version, if any, is left in place, complete.
    """

    def __init__(self, path: PathLike, cause: BaseException, errno_: Optional[int] = None):
        self.path = os.fspath(path)
        self.cause = cause
        code = errno_ if errno_ is not None else getattr(cause, 'errno', None)
        super().__init__(code, _describe_write_failure(self.path, cause, code))

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # picklable (multiprocessing, torchrun error files)
        return (_rebuild_disk_write_error, (self.path, self.strerror, self.errno))


def _rebuild_disk_write_error(path, message, code):
    e = DiskWriteError.__new__(DiskWriteError)
    OSError.__init__(e, code, message)
    e.path, e.cause = path, None
    return e


_ERRNO_HINTS = {
    errno.ENOSPC: 'no space left on the device (disk full); free space there, or write elsewhere',
    errno.EDQUOT: 'disk quota exceeded; free space in your quota, or write elsewhere',
    errno.EROFS: 'the file system is read-only; write elsewhere',
    errno.EACCES: 'permission denied; make the folder writable, or write elsewhere',
    errno.EPERM: 'operation not permitted; make the folder writable, or write elsewhere',
    errno.EFBIG: 'file too large for this file system',
    errno.EIO: 'I/O error on the device (failing disk or lost network mount)',
}


def _free_bytes(folder: str) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _describe_write_failure(path: str, cause: BaseException, code: Optional[int]) -> str:
    folder = os.path.dirname(os.path.abspath(path)) or '.'
    if code is None and isinstance(cause, RuntimeError):
        # torch's zip writer reports a short write as "unexpected pos N vs M", losing the errno: look at the disk
        free = _free_bytes(folder)
        if free is not None and free < (1 << 20):
            code = errno.ENOSPC
        elif not os.access(folder, os.W_OK):
            code = errno.EACCES
    if code in _ERRNO_HINTS:
        problem = _ERRNO_HINTS[code]
        if code in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(folder)
            if free is not None:
                problem += f' ({free / 2**20:.1f} MiB free in {folder})'
        return f'cannot write {path}: {problem} [{errno.errorcode.get(code, code)}]'
    return f'cannot write {path}: {_one_line(cause)}'


def _read_umask() -> int:
    try:  # Linux >= 4.7: read without changing it (os.umask(x) would briefly change it for every thread)
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode a new file gets from ``open()``/``torch.save`` (and timm): ``0o666 & ~umask`` (0644 with umask 022)."""
    return 0o666 & ~_read_umask()


def default_dir_mode() -> int:
    """Mode a new folder gets from ``os.makedirs``: ``0o777 & ~umask`` (0755 with umask 022)."""
    return 0o777 & ~_read_umask()


def apply_umask(path: PathLike) -> None:
    """Give ``path`` the mode an ordinary new file (or folder) would have had: for files written by tools that
    create them 0600 (``tempfile.mkstemp``, ``mkdtemp``, safetensors' ``save_file``)."""
    os.chmod(path, default_dir_mode() if os.path.isdir(path) else default_file_mode())


def _temp_name(path: Path) -> Path:
    return path.parent / f'.{path.name}.{secrets.token_hex(4)}.tmp'


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.NAME.XXXXXXXX.tmp``, not yet existing); when the block
    succeeds it is moved onto ``path`` with one ``os.replace``. On any failure the temporary file is removed and
    ``path`` keeps its previous version; an ``OSError`` (disk full, read-only, ...) becomes a one-line
    ``DiskWriteError`` naming ``path``. The new file gets ``0o666 & ~umask`` like any new file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiskWriteError(path, e) from None
    tmp = _temp_name(path)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, default_file_mode())  # writers such as safetensors create 0600 files
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, DiskWriteError):
            raise
        if isinstance(e, OSError):
            raise DiskWriteError(path, e) from None
        raise


class _RecordingFile:
    """File wrapper for ``torch.save``: torch turns a failed ``write`` into ``RuntimeError('unexpected pos
    ...')``; this keeps the real ``OSError`` (ENOSPC, EROFS...) so the message can name the disk problem."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open_new(tmp: Path):
    # O_EXCL: never follow a planted link or reuse a file; mode 0o666 is reduced by the umask, as for open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0), 0o666)
    return os.fdopen(fd, 'wb')


def write_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically: temp file in the same folder + ``os.replace``.

    The file gets ``0o666 & ~umask`` (as timm's and Python's writes); a failed write (disk full, read-only)
    raises a one-line ``DiskWriteError`` and leaves the previous ``path`` untouched and no temp file behind.
    """
    path = Path(path)
    payload = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    with atomic_output(path) as tmp:
        with _open_new(tmp) as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    return path


def torch_save_file(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` into a new file (0o666 & ~umask), fsynced; a write failure raises a one-line
    ``DiskWriteError`` naming the disk problem instead of torch's ``unexpected pos``. Not atomic by itself
    (see ``save_checkpoint_atomic``); a partial file is removed."""
    path = Path(path)
    try:
        f = _open_new(path)  # O_EXCL: an existing file is never truncated or removed here
    except OSError as e:
        raise DiskWriteError(path, e) from None
    rec = _RecordingFile(f)
    try:
        with f:
            torch.save(obj, rec)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        try:
            os.unlink(path)  # the partial file this call created
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            cause = rec.error if rec.error is not None else e
            if isinstance(cause, OSError) or _looks_like_short_write(cause):
                raise DiskWriteError(path, cause) from None
        raise


def _looks_like_short_write(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and ('unexpected pos' in str(e) or 'inline_container' in str(e))


def save_checkpoint_atomic(state: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save(state, path)`` through a temp file in the same folder and ``os.replace`` (file mode
    ``0o666 & ~umask``); disk full or read-only is a one-line ``DiskWriteError`` and the old ``path`` stays."""
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            torch_save_file(state, tmp)
        except DiskWriteError as e:  # name the destination, not the temp file
            raise DiskWriteError(path, e.cause if e.cause is not None else e, e.errno) from None
    return path


def check_regular_file(path: PathLike, flag: str = '--data-dir') -> None:
    """Refuse a path that is not a regular file (a FIFO would block the reader forever, a device or socket is
    never an image, a broken link points nowhere): one-line ValueError naming it. One ``stat``, no open."""
    p = os.fspath(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        kind = 'a broken symlink' if os.path.islink(p) else 'missing'
        raise ValueError(f'{flag}: {p} is {kind}, not an image file; remove it') from None
    except OSError as e:
        raise ValueError(f'{flag}: cannot read {p} ({_one_line(e)}); fix or remove it') from None
    if not stat.S_ISREG(mode):
        raise ValueError(f'{flag}: {p} is {_file_kind(mode)}, not a regular image file; remove it')


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return 'a folder'
    if stat.S_ISFIFO(mode):
        return 'a FIFO (named pipe)'
    if stat.S_ISSOCK(mode):
        return 'a socket'
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return 'a device'
    return 'not a regular file'


def load_checkpoint_file(path: PathLike, flag: str = 'checkpoint', map_location='cpu') -> Any:
    """``torch.load(path, weights_only=True)`` (``argparse.Namespace`` allowed) with one-line errors.

    ``.safetensors`` files are read with safetensors. Raises FileNotFoundError for a missing file and
    ValueError naming ``flag`` and the file for anything unreadable (truncated, not a checkpoint, unsafe
    pickle content).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag}: file not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
            return load_file(path, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f'{flag}: cannot read safetensors file {path}: {_one_line(e)}') from None
    try:
        if hasattr(torch.serialization, 'safe_globals'):
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError) as e:
        raise ValueError(f'{flag}: cannot read checkpoint {path} (corrupt, truncated or not a torch '
                         f'checkpoint): {_one_line(e)}') from None


def load_state_dict_file(path: PathLike, flag: str = 'checkpoint', use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A model state dict from a timm training checkpoint (``state_dict`` / ``state_dict_ema``), an
    mdistiller-style ``{'model': ...}`` dict, a plain state dict or a ``.safetensors`` file.

    ``module.`` prefixes (DDP) and ``_orig_mod.`` (torch.compile) are stripped.
    """
    ckpt = load_checkpoint_file(path, flag)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{flag}: {path} does not hold a state dict (got {type(ckpt).__name__})')
    keys = ('state_dict_ema', 'state_dict') if use_ema else ('state_dict', 'model', 'state_dict_ema')
    state = ckpt
    for k in keys:
        if isinstance(ckpt.get(k), dict):
            state = ckpt[k]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{flag}: {path} has no tensor state dict (keys: {", ".join(list(ckpt)[:8])})')
    out = {}
    for k, v in state.items():
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def check_writable_dir(path: PathLike, flag: str = '--output') -> None:
    """Refuse a folder that cannot be created or written: the first existing ancestor of ``path`` must be a
    folder we may write into. Cheap (no file is created), so it runs before anything is built."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f'{flag}: cannot create {path}: {probe} exists and is not a folder')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f'{flag}: folder {probe} is not writable (needed for {path})')


def check_image_files(paths: Sequence[PathLike], flag: str = '--data-dir') -> None:
    """Open every image's header with Pillow (no pixel decode, ~10-50 us a file) and raise ValueError naming
    the first file that is not a readable image. Non-regular files (FIFO, device, socket, broken link) are
    refused by name before they are opened, so a FIFO named ``x.png`` cannot hang the check."""
    from PIL import Image
    for p in paths:
        check_regular_file(p, flag)  # before open(): opening a FIFO blocks until a writer appears
        try:
            with Image.open(p) as img:
                img.size  # noqa: B018  (header parsed)
        except Exception as e:  # PIL raises UnidentifiedImageError / OSError / SyntaxError for bad files
            raise ValueError(f'{flag}: unreadable image {os.fspath(p)} ({_one_line(e)}); fix or remove it') from None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__
