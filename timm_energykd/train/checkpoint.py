"""Checkpoints: timm's CheckpointSaver made atomic, and ``--resume`` that restores exactly what was saved."""
from typing import Optional

from timm.utils.model import unwrap_model

from .. import files
from ..files import load_checkpoint_file
from .identity import identity_differences, sha256_file


# timm's CheckpointSaver made atomic, umask-respecting and with one-line disk errors: see timm_energykd.files
AtomicCheckpointSaver = files.AtomicCheckpointSaver


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
