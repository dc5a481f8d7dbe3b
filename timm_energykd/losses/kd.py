"""Hinton KD (``kd``) and Energy KD (``energy_kd``: the same loss at the energy policy's temperatures)."""
from typing import Union

import torch
import torch.nn.functional as F

from .registry import DistillLoss, as_sample_temperature, register_distill_loss

__all__ = ['kd_loss_per_sample', 'KDLoss', 'EnergyKDLoss']


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


@register_distill_loss('kd', energy_name='energy_kd')
class KDLoss(DistillLoss):
    """Hinton KD: batch mean of ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

    ``energy_kd`` (Kim et al.) is this loss with ``temperature_source='energy'``: the task passes the energy
    policy's per-sample temperatures instead of its base temperature.
    """

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        s, t = self.prepare_logits(student_logits, teacher_logits)
        return kd_loss_per_sample(s, t, temperature)


def EnergyKDLoss(**kwargs) -> KDLoss:
    """Energy KD: ``KDLoss(temperature_source='energy')`` (what the name ``energy_kd`` builds)."""
    return KDLoss(temperature_source='energy', **kwargs)
