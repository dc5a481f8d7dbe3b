"""Atomic file writes and safe checkpoint reading.

Every file the trainer writes goes through a temporary file in the same folder followed by ``os.replace``,
so a crash (or a pre-empted job) never leaves a half-written ``args.yaml``, threshold cache or checkpoint
behind: readers see either the old file or the new one.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles); timm training
checkpoints store ``args`` as an ``argparse.Namespace``, which is allow-listed.
"""
import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import torch

__all__ = ['write_atomic', 'save_checkpoint_atomic', 'load_checkpoint_file', 'load_state_dict_file',
           'check_writable_dir', 'check_image_files']

PathLike = Union[str, os.PathLike]


def write_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically: temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint_atomic(state: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save(state, path)`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    the first file that is not a readable image."""
    from PIL import Image
    for p in paths:
        try:
            with Image.open(p) as img:
                img.size  # noqa: B018  (header parsed)
        except Exception as e:  # PIL raises UnidentifiedImageError / OSError / SyntaxError for bad files
            raise ValueError(f'{flag}: unreadable image {os.fspath(p)} ({_one_line(e)}); fix or remove it') from None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__
