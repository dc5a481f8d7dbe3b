"""Decoupled KD (``dkd``) and Energy DKD (``energy_dkd``), with DKD's warm-up.

Warm-up (``warmup_mode``), given the task's progress ``p`` in fractional 0-based epochs (``epoch + step /
steps_per_epoch``, as ``set_progress`` receives it):

* ``'mdistiller'`` (default; mdistiller's and the Energy KD authors' rule): ``min(e / W, 1)`` with the
  integer 1-based epoch ``e = floor(p) + 1``. The first epoch already has ``1 / W``; with ``W = 1`` the full
  DKD term applies from the first step.
* ``'linear'``: a smooth ramp ``min(p / W, 1)``, 0 at the first step.
"""
import math
from typing import Union

import torch
import torch.nn.functional as F

from .registry import DistillLoss, as_sample_temperature, hard_target, register_distill_loss

__all__ = ['dkd_loss_per_sample', 'dkd_warmup_factor', 'DKDLoss', 'EnergyDKDLoss', 'WARMUP_MODES']

WARMUP_MODES = ('mdistiller', 'linear')


def dkd_warmup_factor(progress: float, warmup_epochs: float, mode: str = 'mdistiller') -> float:
    """DKD's warm-up factor at ``progress`` (fractional 0-based epochs); see the module docstring."""
    if mode not in WARMUP_MODES:
        raise ValueError(f"warmup_mode='{mode}'; expected one of: {', '.join(WARMUP_MODES)}")
    if warmup_epochs <= 0:
        return 1.0
    p = max(float(progress), 0.0)
    if mode == 'mdistiller':
        return min((math.floor(p) + 1) / warmup_epochs, 1.0)
    return min(p / warmup_epochs, 1.0)


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


@register_distill_loss('dkd', energy_name='energy_dkd')
class DKDLoss(DistillLoss):
    """Decoupled KD times its warm-up factor (see the module docstring for ``warmup_mode``).

    Soft targets (mixup / label smoothing) use their arg-max as the target class. ``energy_dkd`` is this
    loss with ``temperature_source='energy'``.

    Args:
        alpha: TCKD weight.
        beta: NCKD weight.
        warmup_epochs: Warm-up length W in epochs (0 disables it).
        warmup_mode: ``'mdistiller'`` (default) or ``'linear'``.
        temperature_source: ``'fixed'`` or ``'energy'``.
    """
    trainer_options = {'dkd_alpha': 'alpha', 'dkd_beta': 'beta', 'dkd_warmup': 'warmup_epochs',
                       'dkd_warmup_mode': 'warmup_mode'}

    def __init__(
            self,
            alpha: float = 1.0,
            beta: float = 8.0,
            warmup_epochs: float = 20,
            warmup_mode: str = 'mdistiller',
            temperature_source: str = 'fixed',
    ):
        super().__init__(temperature_source)
        if warmup_epochs < 0:
            raise ValueError(f'warmup_epochs={warmup_epochs}; expected >= 0')
        dkd_warmup_factor(0.0, 1.0, warmup_mode)  # validates the mode
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_mode = warmup_mode
        self.epoch = 0.0

    def set_progress(self, epoch: float) -> None:
        self.epoch = float(epoch)

    @property
    def warmup_factor(self) -> float:
        return dkd_warmup_factor(self.epoch, self.warmup_epochs, self.warmup_mode)

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        s, t = self.prepare_logits(student_logits, teacher_logits)
        loss = dkd_loss_per_sample(s, t, hard_target(target), temperature, alpha=self.alpha, beta=self.beta)
        return self.warmup_factor * loss

    def extra_repr(self) -> str:
        return (f'alpha={self.alpha}, beta={self.beta}, warmup_epochs={self.warmup_epochs}, '
                f'warmup_mode={self.warmup_mode}, temperature_source={self.temperature_source}')


def EnergyDKDLoss(**kwargs) -> DKDLoss:
    """Energy DKD: ``DKDLoss(temperature_source='energy')`` (what the name ``energy_dkd`` builds)."""
    return DKDLoss(temperature_source='energy', **kwargs)
