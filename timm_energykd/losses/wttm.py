"""WTTM (Zheng and Yang, ICLR 2024): ``wttm`` and ``energy_wttm`` (per-sample power ``1 / T_i``)."""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .registry import DistillLoss, as_sample_temperature, register_distill_loss

__all__ = ['wttm_loss_per_sample', 'WTTM']


def wttm_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        gamma: Union[float, torch.Tensor],
        weighted: bool = True,
) -> torch.Tensor:
    """WTTM per sample: U_gamma(p_t) * KL(p_t^gamma / U_gamma(p_t) || softmax(s)). Returns [B].

    p_t = softmax(teacher), U_gamma(p) = sum_j p_j^gamma is the power sum (1 for one-hot, C^(1-gamma) for
    uniform), and the power-transformed teacher p_t^gamma / U equals softmax(gamma * teacher). The student
    has no temperature. ``gamma`` may be a float or a [B] tensor (per-sample gamma_i = 1 / T_i).
    ``weighted=False`` gives plain TTM. All in log space, float32.
    """
    g = as_sample_temperature(gamma, student_logits)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    log_u = torch.logsumexp(g * log_p_t, dim=-1, keepdim=True)  # log of the power sum
    log_p_hat = g * log_p_t - log_u
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    kl = (log_p_hat.exp() * (log_p_hat - log_q)).sum(dim=-1)
    if not weighted:
        return kl
    # the weight is a teacher-only quantity: it carries no gradient in the paper's objective
    return log_u.squeeze(1).detach().exp() * kl


@register_distill_loss('wttm', energy_name='energy_wttm')
class WTTM(DistillLoss):
    """Weighted transformed teacher matching: mean_i U_gamma(p_t,i) * KL(p_t,i^gamma / U || softmax(s_i)).

    ``gamma = 1 / temperature`` (the task's base T, or with ``energy_wttm`` each sample's energy T_i) unless
    ``gamma`` fixes it. Their beta multiplier is the trainer's ``--distill-loss-weight``.

    Args:
        gamma: fixed power (0 < gamma <= 1); None (default) uses 1 / temperature. Refused with
            ``temperature_source='energy'``, which would then have no effect.
        weighted: False gives plain TTM (no sample-adaptive weight).
        temperature_source: ``'fixed'`` or ``'energy'``.
    """

    def __init__(self, gamma: Optional[float] = None, weighted: bool = True, temperature_source: str = 'fixed'):
        super().__init__(temperature_source)
        if gamma is not None and not 0 < gamma <= 1:
            raise ValueError(f'wttm: gamma must be in (0, 1], got {gamma}')
        if gamma is not None and self.uses_energy_temperature:
            raise ValueError('energy_wttm: gamma fixes the power, so the energy temperatures would be ignored; '
                             'leave gamma unset (gamma_i = 1 / T_i) or use wttm')
        self.gamma = gamma
        self.weighted = weighted

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        gamma = self.gamma if self.gamma is not None else 1.0 / as_sample_temperature(temperature, student_logits)
        return wttm_loss_per_sample(student_logits, teacher_logits, gamma, self.weighted)
