"""Build a distillation teacher with its own classifier head.

timm's ``DistillationTeacher`` creates the teacher with the *student's* ``num_classes``; when the
pretrained head has a different class count timm drops it and the teacher silently gets a random head.
Here the teacher's class count comes from its weights, and a mismatch with the student is refused.

    teacher = build_teacher('resnet50', num_classes=1000, pretrained=True)
    teacher = build_teacher('cifar_resnet32x4', num_classes=100, checkpoint='output/train/t/model_best.pth.tar')

Teacher-side transforms live here too: ``BlendedTeacher`` (R2KD's ``0.7 * teacher + 0.3 * pruned teacher``
logits) wraps a teacher, so energies, thresholds and every loss see the same blended logits.
"""
import copy
import logging
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils import prune
import timm
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from .files import load_state_dict_file

__all__ = ['build_teacher', 'check_pretrained_head', 'as_distillation_teacher', 'classifier_weight_key', 'checkpoint_num_classes', 'make_pruned_teacher', 'BlendedTeacher']

_logger = logging.getLogger(__name__)


def classifier_weight_key(model: nn.Module) -> Optional[str]:
    """State-dict key of the classifier weight of a timm model (``pretrained_cfg['classifier']``, else the
    module returned by ``get_classifier()``); None when it cannot be found."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier')
    names = [names] if isinstance(names, str) else list(names or [])
    state_keys = set(model.state_dict().keys())
    for n in names:
        if f'{n}.weight' in state_keys:
            return f'{n}.weight'
    if hasattr(model, 'get_classifier'):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and f'{name}.weight' in state_keys:
                return f'{name}.weight'
    return None


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor], key: str) -> Optional[int]:
    w = state_dict.get(key)
    return int(w.shape[0]) if w is not None and w.ndim >= 1 else None


def has_pretrained_weights(name: str) -> bool:
    """Whether timm knows a source (Hub id, URL or file) of pretrained weights for ``name``."""
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        return True
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return False
    return bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))


def check_pretrained_head(name: str, num_classes: Optional[int], pretrained_path: Optional[str] = None) -> None:
    """Refuse a teacher name whose timm pretrained head predicts another class count than the student.

    timm's ``DistillationTeacher`` builds a named teacher with the student's ``num_classes`` and, when timm's
    pretrained weights have another class count, drops their classifier: the teacher silently gets a random
    head. With ``pretrained_path`` timm loads that file strictly at the student's class count (a mismatch
    fails there), so only timm's own pretrained source is checked here.
    """
    if pretrained_path or num_classes is None:
        return
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    got = getattr(cfg, 'num_classes', None) if cfg is not None else None
    if got is not None and int(got) != int(num_classes):
        raise ValueError(
            f"teacher '{name}': timm's pretrained weights predict {got} classes but the student has {num_classes}; "
            f'timm would replace the head by a random one. Pass a trained teacher module (build_teacher) or '
            f'teacher_pretrained_path with weights for {num_classes} classes')


def as_distillation_teacher(
        teacher: Union[str, nn.Module, DistillationTeacher],
        student: nn.Module,
        pretrained_path: Optional[str],
        device: Optional[torch.device],
        dtype: Optional[torch.dtype],
) -> Union[str, DistillationTeacher]:
    """The teacher for timm's ``LogitDistillationTask`` (what ``EnergyDistillationTask`` passes it).

    A name is left to timm's builder (the student's class count, weights from ``pretrained_path`` or timm's
    pretrained source), after refusing a pretrained head with another class count, which timm would silently
    replace by a random one. A module is wrapped in timm's ``DistillationTeacher`` as it is (its own head).
    """
    if isinstance(teacher, DistillationTeacher):
        return teacher
    if isinstance(teacher, str):
        check_pretrained_head(teacher, getattr(unwrap_model(student), 'num_classes', None), pretrained_path)
        return teacher
    if isinstance(teacher, nn.Module):
        return DistillationTeacher(teacher, device=device, dtype=dtype)
    raise TypeError(f'teacher_model must be a model name, an nn.Module or a DistillationTeacher, '
                    f'got {type(teacher).__name__}')


def _check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Weights on the Hub that are not in the local cache need the Hub: find out with one connection (seconds),
    not through huggingface_hub's retries (about a minute offline) before the same error."""
    import socket
    from urllib.parse import urlparse
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return
    repo = getattr(cfg, 'hf_hub_id', None)
    if not repo or getattr(cfg, 'file', None):
        return  # a URL or a local file: timm's own loader reports its errors quickly
    from huggingface_hub import constants, try_to_load_from_cache
    repo_id = repo.split('@')[0]
    names = [getattr(cfg, 'hf_hub_filename', None), 'model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin']
    if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in names if f):
        return
    host = urlparse(constants.ENDPOINT).hostname or 'huggingface.co'
    if constants.HF_HUB_OFFLINE:
        reason = 'HF_HUB_OFFLINE is set'
    else:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return
        except OSError as e:
            reason = f'{host} is not reachable: {e}'
    raise ValueError(f"--teacher-pretrained: timm's pretrained weights for '{name}' ({repo_id}) are not in the local "
                     f'Hub cache and {reason}; pass --teacher-checkpoint PATH, or --no-teacher-pretrained for a random '
                     'teacher')


def resolve_teacher_pretrained(name: str, pretrained: Optional[bool], checkpoint: Optional[str]) -> bool:
    """``--teacher-pretrained`` left unset means: pretrained when there is no checkpoint and timm has weights for
    ``name`` (what timm's ``DistillationTeacher`` does for a model name); an explicit True / False is kept."""
    if checkpoint:
        return False
    if pretrained is None:
        return has_pretrained_weights(name)
    return bool(pretrained)


def build_teacher(
        name: str,
        num_classes: int,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        in_chans: int = 3,
        use_ema: bool = False,
        **model_kwargs,
) -> nn.Module:
    """Create the teacher ``name`` with its own head, in eval mode, parameters frozen.

    Args:
        name: timm model name (plugin architectures such as ``cifar_resnet32x4`` included).
        num_classes: The student's class count; the teacher must predict the same classes.
        pretrained: Load timm's pretrained weights (its own head; must have ``num_classes`` classes).
        checkpoint: Teacher weights: a timm training checkpoint (``.pth.tar`` with ``state_dict`` /
            ``state_dict_ema``), a plain state dict, an mdistiller ``{'model': ...}`` dict or ``.safetensors``.
            Loaded strictly; takes precedence over ``pretrained``.
        in_chans: Input channels.
        use_ema: Prefer ``state_dict_ema`` from a timm checkpoint.
        **model_kwargs: Passed to ``timm.create_model``.

    Raises:
        FileNotFoundError / ValueError: one line naming the flag and file (missing, corrupt, class-count
        mismatch, wrong architecture).
    """
    try:
        timm.models.get_arch_name(name)
        known = timm.is_model(name) or name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:'))
    except Exception:
        known = False
    if not known:
        raise ValueError(f"--teacher: '{name}' is not a timm model name (see timm.list_models())")

    if checkpoint:
        state = load_state_dict_file(checkpoint, flag='--teacher-checkpoint', use_ema=use_ema)
        probe = timm.create_model(name, pretrained=False, in_chans=in_chans, **model_kwargs)
        key = classifier_weight_key(probe)
        ckpt_classes = checkpoint_num_classes(state, key) if key else None
        if key and key in state and ckpt_classes is None:
            raise ValueError(f'--teacher-checkpoint: cannot read the class count from {key} in {checkpoint}')
        if key and key not in state:
            raise ValueError(
                f"--teacher-checkpoint: {checkpoint} has no classifier weight '{key}' for --teacher {name} "
                f"(wrong architecture?)")
        if ckpt_classes is not None and ckpt_classes != num_classes:
            raise ValueError(
                f'--teacher-checkpoint: {checkpoint} predicts {ckpt_classes} classes but the student has '
                f'{num_classes} (--num-classes / dataset); a teacher must predict the same classes')
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = ' '.join(first[1:3])[:300] if len(first) > 1 else first[0][:300]
            raise ValueError(
                f'--teacher-checkpoint: {checkpoint} does not match --teacher {name} (strict load failed: {detail})'
            ) from None
        _logger.info(f"Teacher '{name}' ({num_classes} classes) loaded from {checkpoint}")
    elif pretrained:
        _check_hub_reachable(name)
        try:
            model = timm.create_model(name, pretrained=True, in_chans=in_chans, **model_kwargs)  # its own head
        except (OSError, RuntimeError) as e:  # no network / Hub offline / bad download
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"--teacher-pretrained: could not load timm's pretrained weights for '{name}' ({first}); "
                f'pass --teacher-checkpoint PATH, or --no-teacher-pretrained for a random teacher') from None
        got = getattr(model, 'num_classes', None)
        if got != num_classes:
            raise ValueError(
                f"--teacher-pretrained: timm's pretrained '{name}' predicts {got} classes but the student has "
                f'{num_classes}; train a teacher on your classes first and pass --teacher-checkpoint')
        _logger.info(f"Teacher '{name}' with timm pretrained weights ({got} classes)")
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
        _logger.warning(
            f"Teacher '{name}' has RANDOM weights (no --teacher-checkpoint, and no pretrained weights used): "
            f'distillation from it is only useful for smoke tests')

    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


def make_pruned_teacher(teacher: nn.Module, amount: float = 0.1) -> nn.Module:
    """A frozen copy of ``teacher`` with ``amount`` of each conv / linear weight zeroed by L1 magnitude.

    Deep-copies the teacher, applies ``torch.nn.utils.prune.l1_unstructured`` to the ``weight`` of every
    ``nn.Conv1d/2d/3d`` (and transposed) and ``nn.Linear`` module (timm's subclasses included), then
    ``prune.remove`` so the zeros are baked into plain parameters. The original teacher is not touched.
    """
    if not 0 <= amount < 1:
        raise ValueError(f'make_pruned_teacher: amount must be in [0, 1), got {amount}')
    pruned = copy.deepcopy(teacher)
    for module in pruned.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(
                getattr(module, 'weight', None), nn.Parameter):
            prune.l1_unstructured(module, name='weight', amount=amount)
            prune.remove(module, 'weight')
    pruned.requires_grad_(False)
    return pruned


class BlendedTeacher(nn.Module):
    """Teacher whose logits are ``teacher_weight * teacher(x) + (1 - teacher_weight) * pruned(x)`` (R2KD).

    Give it to the distillation task in place of the teacher. ``pretrained_cfg`` and ``num_classes`` are
    copied from the teacher so normalisation and class-count checks see the same values. Both inner
    models stay in eval mode whatever ``.train()`` is called with.

    Args:
        teacher: the trained teacher.
        pruned_teacher: its pruned copy; None builds one with ``make_pruned_teacher(teacher, prune_amount)``.
        teacher_weight: weight of the unpruned teacher (0.7 published).
        prune_amount: fraction of each conv / linear weight pruned when ``pruned_teacher`` is None (0.1).
    """

    def __init__(
            self,
            teacher: nn.Module,
            pruned_teacher: Optional[nn.Module] = None,
            teacher_weight: float = 0.7,
            prune_amount: float = 0.1,
    ):
        super().__init__()
        if not 0 <= teacher_weight <= 1:
            raise ValueError(f'BlendedTeacher: teacher_weight must be in [0, 1], got {teacher_weight}')
        self.teacher = teacher
        self.pruned_teacher = pruned_teacher if pruned_teacher is not None else make_pruned_teacher(
            teacher, prune_amount)
        self.teacher_weight = teacher_weight
        for name in ('pretrained_cfg', 'num_classes'):
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))

    def train(self, mode: bool = True) -> 'BlendedTeacher':
        # a teacher never trains: keep BatchNorm statistics frozen even when the task calls .train()
        # (timm 1.0.29's LogitDistillationTask does not keep its teacher in eval itself)
        self.training = mode
        self.teacher.eval()
        self.pruned_teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.teacher_weight
        return w * self.teacher(x) + (1.0 - w) * self.pruned_teacher(x)
