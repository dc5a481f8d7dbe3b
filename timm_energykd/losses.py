"""Distillation losses with per-sample temperatures, and their registry.

Every distillation loss here is an ``nn.Module`` whose ``forward`` takes

    student_logits  [B, C]  (any float dtype; computed in float32 inside)
    teacher_logits  [B, C]  (no grad needed)
    target          [B] class indices, or [B, C] soft targets (mixup / label smoothing)
    temperature     python float, 0-d tensor or [B] tensor of per-sample temperatures (> 0)

and returns a scalar loss (batch mean). Per-sample losses are exposed as free functions so they can be
tested against float64 references alone.

Losses that want the per-sample temperature of the energy policy set the class attribute
``uses_energy_temperature = True``; the distillation task then passes the policy's [B] temperatures,
otherwise it passes the fixed base temperature.

Losses may also define ``per_sample(student_logits, teacher_logits, target, temperature) -> [B]`` (all
the built-in ones do); the task then masks samples with non-finite teacher logits out of the mean.
Losses without it get those rows' teacher logits replaced by the detached student logits instead.

New losses register by name:

    @register_distill_loss('my_kd')
    class MyKD(DistillLoss):
        ...

    loss = create_distill_loss('my_kd', temperature=4.0)
"""
from typing import Callable, Dict, List, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'DistillLoss', 'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'is_distill_loss',
    'uses_energy_temperature',
    'hard_target', 'as_sample_temperature', 'kd_loss_per_sample', 'dkd_loss_per_sample',
    'KDLoss', 'EnergyKDLoss', 'DKDLoss', 'EnergyDKDLoss',
]

_DISTILL_LOSSES: Dict[str, Type[nn.Module]] = {}


def register_distill_loss(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator that registers a distillation loss under ``name``."""
    def _register(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in _DISTILL_LOSSES and _DISTILL_LOSSES[name] is not cls:
            raise ValueError(f"distillation loss '{name}' is already registered by {_DISTILL_LOSSES[name].__name__}")
        _DISTILL_LOSSES[name] = cls
        cls.loss_name = name
        return cls
    return _register


def list_distill_losses() -> List[str]:
    """Names of all registered distillation losses, sorted."""
    return sorted(_DISTILL_LOSSES)


def is_distill_loss(name: str) -> bool:
    return name in _DISTILL_LOSSES


def uses_energy_temperature(name: str) -> bool:
    """Whether the registered loss ``name`` takes the energy policy's per-sample temperatures."""
    return bool(getattr(_DISTILL_LOSSES[name], 'uses_energy_temperature', False))


def create_distill_loss(name: str, **kwargs) -> nn.Module:
    """Build a registered distillation loss by name; unknown names list the known ones."""
    if name not in _DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss '{name}'; expected one of: {', '.join(list_distill_losses())}")
    return _DISTILL_LOSSES[name](**kwargs)


class DistillLoss(nn.Module):
    """Base class: a logit distillation loss with an optional per-sample temperature.

    Subclasses implement ``forward(student_logits, teacher_logits, target, temperature)``.
    ``set_progress(epoch)`` is called by the trainer at each epoch start (fractional epochs allowed) for
    losses with a schedule such as DKD's warm-up; the default ignores it.
    """
    uses_energy_temperature: bool = False
    loss_name: str = ''

    def set_progress(self, epoch: float) -> None:
        pass

    def forward(
            self,
            student_logits: torch.Tensor,
            teacher_logits: torch.Tensor,
            target: torch.Tensor,
            temperature: Union[float, torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices from hard [B] or soft [B, C] targets.

    Losses that need the ground-truth class (DKD, TISD, ...) use the arg-max of a soft target: with
    timm's mixup that is the dominant image's (smoothed) label, the usual rule in KD code.
    """
    return target.argmax(dim=-1) if target.ndim == 2 else target


def as_sample_temperature(temperature: Union[float, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """Temperature as a float32 [B, 1] column broadcastable over classes."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.ndim == 0:
        t = t.expand(logits.shape[0])
    return t.reshape(-1, 1)


def kd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Union[float, torch.Tensor],
) -> torch.Tensor:
    """Hinton KD per sample: KL(softmax(t/T) || softmax(s/T)) * T^2, each sample with its own T. Returns [B].

    Computed in float32 from log-softmaxes (never a log of a probability), so logits of any magnitude and
    fp16/bf16 inputs give finite values.
    """
    t = as_sample_temperature(temperature, student_logits)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl * t.squeeze(1) ** 2


def _non_target_index(target_idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, C-1] indices of every class except the target, built arithmetically (gather, no boolean indexing,
    so no host sync and no -inf masking whose 0 * inf would poison the gradients)."""
    cols = torch.arange(num_classes - 1, device=target_idx.device).unsqueeze(0)
    return cols + (cols >= target_idx.unsqueeze(1)).long()


def dkd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target_idx: torch.Tensor,
        temperature: Union[float, torch.Tensor],
        alpha: float = 1.0,
        beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022) per sample: ``(alpha * TCKD + beta * NCKD) * T^2``. Returns [B].

    TCKD is the KL between the binary (target, non-target) distributions, NCKD the KL between the softmaxes
    over the non-target classes; ``KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD``. Everything is in
    log space in float32: ``log(1 - p)`` is ``logsumexp(non-target) - logsumexp(all)``, never the log of a
    (possibly underflowed) probability, so two-class problems and huge logits stay finite.
    """
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f'DKD needs at least 2 classes, got logits with {num_classes}')
    t = as_sample_temperature(temperature, student_logits)
    target_idx = target_idx.long()
    zs = student_logits.float() / t
    zt = teacher_logits.float() / t
    tgt = target_idx.unsqueeze(1)
    nt_idx = _non_target_index(target_idx, num_classes)
    zs_nt, zt_nt = zs.gather(1, nt_idx), zt.gather(1, nt_idx)

    lse_s, lse_t = torch.logsumexp(zs, dim=1), torch.logsumexp(zt, dim=1)
    log_ps_gt = zs.gather(1, tgt).squeeze(1) - lse_s
    log_pt_gt = zt.gather(1, tgt).squeeze(1) - lse_t
    log_ps_nt = torch.logsumexp(zs_nt, dim=1) - lse_s  # log(1 - p_s[target])
    log_pt_nt = torch.logsumexp(zt_nt, dim=1) - lse_t
    tckd = log_pt_gt.exp() * (log_pt_gt - log_ps_gt) + log_pt_nt.exp() * (log_pt_nt - log_ps_nt)

    log_qs = F.log_softmax(zs_nt, dim=1)
    log_qt = F.log_softmax(zt_nt, dim=1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).sum(dim=1)
    return (alpha * tckd + beta * nckd) * t.squeeze(1) ** 2


@register_distill_loss('kd')
class KDLoss(DistillLoss):
    """Hinton KD: batch mean of ``KL(softmax(t/T) || softmax(s/T)) * T^2`` at the temperature the caller passes.

    The task passes its fixed base temperature (``uses_energy_temperature = False``).
    """

    def per_sample(self, student_logits, teacher_logits, target, temperature) -> torch.Tensor:
        return kd_loss_per_sample(student_logits, teacher_logits, temperature)

    def forward(self, student_logits, teacher_logits, target, temperature):
        return self.per_sample(student_logits, teacher_logits, target, temperature).mean()


@register_distill_loss('energy_kd')
class EnergyKDLoss(KDLoss):
    """Energy KD (Kim et al.): Hinton KD with the energy policy's per-sample temperatures."""
    uses_energy_temperature = True


@register_distill_loss('dkd')
class DKDLoss(DistillLoss):
    """Decoupled KD with a linear warm-up, ``min(epoch / warmup_epochs, 1)`` times the DKD term.

    Soft targets (mixup / label smoothing) use their arg-max as the target class. The warm-up factor
    follows ``set_progress(epoch)`` (fractional epochs allowed); it is 0 until the first call.

    Args:
        alpha: TCKD weight.
        beta: NCKD weight.
        warmup_epochs: Epochs of linear warm-up (0 disables it).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, warmup_epochs: float = 20):
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f'warmup_epochs={warmup_epochs}; expected >= 0')
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.warmup_epochs = float(warmup_epochs)
        self.epoch = 0.0

    def set_progress(self, epoch: float) -> None:
        self.epoch = float(epoch)

    @property
    def warmup_factor(self) -> float:
        if self.warmup_epochs <= 0:
            return 1.0
        return min(max(self.epoch, 0.0) / self.warmup_epochs, 1.0)

    def per_sample(self, student_logits, teacher_logits, target, temperature) -> torch.Tensor:
        loss = dkd_loss_per_sample(
            student_logits, teacher_logits, hard_target(target), temperature, alpha=self.alpha, beta=self.beta)
        return self.warmup_factor * loss

    def forward(self, student_logits, teacher_logits, target, temperature):
        return self.per_sample(student_logits, teacher_logits, target, temperature).mean()

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, beta={self.beta}, warmup_epochs={self.warmup_epochs}'


@register_distill_loss('energy_dkd')
class EnergyDKDLoss(DKDLoss):
    """Energy DKD: DKD with the energy policy's per-sample temperatures."""
    uses_energy_temperature = True
