"""Checkpoints: timm's CheckpointSaver made atomic, and ``--resume`` that restores exactly what was saved."""
import os
from pathlib import Path
from typing import Optional, Union

from timm.utils import CheckpointSaver
from timm.utils.model import unwrap_model

from ..files import DiskWriteError, atomic_output, load_checkpoint_file, save_checkpoint_atomic, write_atomic
from .identity import identity_differences, sha256_file

PathLike = Union[str, Path]


def trim_summary(path: PathLike, start_epoch: int) -> int:
    """Before a resumed run appends to ``summary.csv`` (timm's ``update_summary``): keep the header and the rows
    of epochs before ``start_epoch``, drop later rows and a partial last line, atomically. Rows past the resumed
    checkpoint exist when a run stopped between its summary row and its checkpoint (disk full, kill), and would
    repeat (epochs 0, 1, 1, 2). Returns the number of rows dropped; a missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding='utf-8', errors='replace')
    lines = text.split('\n')
    complete = lines[:-1]  # a last line without its newline is partial (killed mid-write)
    if not complete:
        return 0
    keep = [complete[0]]
    dropped = int(lines[-1].strip() != '')
    for line in complete[1:]:
        head = line.split(',', 1)[0].strip()
        try:
            epoch = int(float(head))
        except ValueError:
            dropped += 1
            continue
        if epoch < start_epoch:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, '\n'.join(keep) + '\n')
    return dropped


class _TorchSaveProxy:
    """Stands in for the ``torch`` module inside timm's ``CheckpointSaver._save`` so that its ``torch.save``
    goes through ``save_checkpoint_atomic``; everything else is the real torch."""

    def __init__(self, real, final_path: Optional[str] = None):
        self._real = real
        self._final = final_path

    def save(self, obj, f, *args, **kwargs):
        if args or kwargs or not isinstance(f, (str, os.PathLike)):
            return self._real.save(obj, f, *args, **kwargs)
        try:
            save_checkpoint_atomic(obj, f)
        except DiskWriteError as e:
            if not self._final:
                raise
            # timm writes ``last`` via ``tmp.pth.tar``: name the checkpoint the user knows
            raise DiskWriteError(self._final, e.cause if e.cause is not None else e, e.errno) from None

    def __getattr__(self, name):
        return getattr(self._real, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` with every file appearing through a temp name and one ``os.replace``.

    timm writes ``last`` via ``tmp.pth.tar`` but unlinks the old ``last`` before the rename, and the copy to
    ``model_best`` / ``checkpoint-N`` unlinks then links (or copies) in place. Here a kill at any moment leaves
    each checkpoint either the previous complete version or the new complete one, new files get
    ``0o666 & ~umask`` (as in timm), and a failed write (disk full, read-only) raises a one-line
    ``DiskWriteError`` naming the file and the disk problem, with no partial file left behind.
    """

    def _save(self, save_path, epoch, metric=None):
        import timm.utils.checkpoint_saver as cs
        real = cs.torch
        final = None
        if os.path.basename(save_path) == 'tmp' + self.extension:
            final = os.path.join(os.path.dirname(save_path), 'last' + self.extension)
        cs.torch = _TorchSaveProxy(real, final)
        try:
            super()._save(save_path, epoch, metric)
        finally:
            cs.torch = real

    def _replace(self, src, dst):
        if os.name == 'nt':
            return super()._replace(src, dst)
        try:  # os.replace alone is atomic on POSIX (a hard-linked checkpoint-N keeps its own inode)
            os.replace(src, dst)
        except OSError as e:
            raise DiskWriteError(dst, e) from None

    def _duplicate(self, src, dst):
        with atomic_output(dst) as tmp:
            try:
                os.link(src, tmp)
            except (OSError, NotImplementedError):
                import shutil
                shutil.copy2(src, tmp)


def check_resume_matches(args, ckpt) -> None:
    """--resume must continue the same experiment: every setting of the run identity must match."""
    old = ckpt.get('args')
    old_identity, new_identity = getattr(old, 'run_identity', None), getattr(args, 'run_identity', None)
    if old_identity is not None and new_identity is not None:
        diffs = identity_differences(old_identity, new_identity)
        if diffs:
            raise ValueError(f'--resume: {args.resume} was trained with other settings ({"; ".join(diffs)}); '
                             'resume with the same settings or start a new run')
        return
    # checkpoints written before the run identity existed: the teacher, its blend and the loss
    if old is not None:
        old_teacher = getattr(old, 'teacher', None) or getattr(old, 'kd_model_name', None)
        new_teacher = args.teacher or getattr(args, 'kd_model_name', None)
        old_loss = getattr(old, 'distill_loss', None) if old_teacher is not None else None
        new_loss = args.distill_loss if new_teacher is not None else None
        if old_teacher != new_teacher:
            raise ValueError(f'--resume: {args.resume} was trained with --teacher {old_teacher}, this run has '
                             f'--teacher {new_teacher}; resume with the same teacher or start a new run')
        old_blend = (getattr(old, 'teacher_prune_amount', 0.0), getattr(old, 'teacher_blend_weight', 0.7))
        new_blend = (args.teacher_prune_amount, args.teacher_blend_weight)
        if old_teacher is not None and old_blend[0] + new_blend[0] > 0 and old_blend != new_blend:
            raise ValueError(f'--resume: {args.resume} was trained with --teacher-prune-amount {old_blend[0]} '
                             f'--teacher-blend-weight {old_blend[1]}, this run has {new_blend[0]} / {new_blend[1]}; '
                             'resume with the same teacher blend or start a new run')
        if old_loss != new_loss:
            raise ValueError(f'--resume: {args.resume} was trained with --distill-loss {old_loss}, this run has '
                             f'--distill-loss {new_loss}; resume with the same loss or start a new run')
    identity = ((ckpt.get('task_state') or {}).get('thresholds') or {}).get('identity') or {}
    old_sha = identity.get('teacher_checkpoint_sha256')
    if old_sha is not None and args.teacher_checkpoint and sha256_file(args.teacher_checkpoint) != old_sha:
        raise ValueError(f'--resume: {args.resume} was distilled from other teacher weights than '
                         f'--teacher-checkpoint {args.teacher_checkpoint} (sha256 differs)')


def resume_checkpoint(args, task, model, optimizer, loss_scaler) -> Optional[int]:
    """Restore model, optimizer, AMP scaler, epoch and the task state (thresholds); EMA after setup_ema."""
    ckpt = load_checkpoint_file(args.resume, flag='--resume')
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(f'--resume: {args.resume} is not a timm training checkpoint (no state_dict)')
    check_resume_matches(args, ckpt)
    try:
        unwrap_model(model).load_state_dict(ckpt['state_dict'], strict=True)
    except RuntimeError as e:
        raise ValueError(f'--resume: {args.resume} does not match --model {args.model}: '
                         f'{str(e).splitlines()[0]}') from None
    if not args.no_resume_opt:
        if optimizer is not None and 'optimizer' in ckpt:
            optimizer.load_state_dict(ckpt['optimizer'])
        if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
            loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if ckpt.get('task_state'):
        task.load_task_state(ckpt['task_state'])
    args._resume_ckpt = ckpt
    epoch = ckpt.get('epoch')
    if epoch is None:
        return None
    return epoch + 1 if ckpt.get('version', 1) > 1 else epoch
