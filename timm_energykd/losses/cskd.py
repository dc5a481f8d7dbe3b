"""CSKD with cosine-similarity-weighted temperature (Ham, Kim et al., arXiv 2311.14307): ``cskd``.

No energy variant: CSWT already picks each sample's temperature (``supports_energy_temperature = False``).
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .r2kd import cosine
from .registry import DistillLoss, as_sample_temperature, register_distill_loss, valid_weights

__all__ = ['cswt_temperature', 'cskd_loss_per_sample', 'cskd_loss', 'CSKD']


def _class_cosine_distance(p_s: torch.Tensor, p_t: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over classes c of (1 - cos(P_s[:, c], P_t[:, c])) over the rows with weight 1."""
    wc = w.unsqueeze(1)
    return (1 - cosine(p_s * wc, p_t * wc, 0, eps)).mean()


def cswt_temperature(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        t_min: float = 2.0,
        t_max: float = 6.0,
        eps: float = 1e-8,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cosine-similarity-weighted temperature per sample, [B], no gradient.

    cs_i = cos(softmax(s_i), softmax(t_i)); the most similar valid sample gets t_min, the least similar
    t_max, linearly in between: T_i = t_min + (t_max - t_min) * (max cs - cs_i) / (max cs - min cs), with
    max / min over the valid rows. A batch where all cs_i are equal gets t_min everywhere.
    """
    with torch.no_grad():
        p_s = F.softmax(student_logits.detach().float(), dim=-1)
        p_t = F.softmax(teacher_logits.detach().float(), dim=-1)
        cs = cosine(p_s, p_t, 1, eps)
        keep = valid_weights(valid, cs) > 0
        cs_max = torch.where(keep, cs, torch.full_like(cs, -float('inf'))).max()
        cs_min = torch.where(keep, cs, torch.full_like(cs, float('inf'))).min()
        frac = ((cs_max - cs) / (cs_max - cs_min).clamp_min(eps)).clamp(0.0, 1.0)
        return t_min + (t_max - t_min) * frac


def cskd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Union[float, torch.Tensor],
        t_min: float = 2.0,
        t_max: float = 6.0,
        fixed_weight: float = 2.0,
        cswt_weight: float = 2.0,
        eps: float = 1e-8,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CSKD as a [B] vector: every row holds the batch value over the valid rows (the loss has no row term).

    value = fixed_weight * mean(T^2) * D(T) + cswt_weight * mean(T_i'^2) * D(T')
    with D(T) = mean_c (1 - cos(P_s[:, c], P_t[:, c])), P = softmax(z / T) row-wise, T' from
    ``cswt_temperature``; means and columns over the valid rows.
    """
    t = as_sample_temperature(temperature, student_logits)
    w = valid_weights(valid, student_logits)
    n = w.sum().clamp(min=1.0)
    s, te = student_logits.float(), teacher_logits.float()
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if fixed_weight != 0:
        d = _class_cosine_distance(F.softmax(s / t, dim=-1), F.softmax(te / t, dim=-1), w, eps)
        loss = loss + fixed_weight * ((t.squeeze(1) ** 2) * w).sum() / n * d
    if cswt_weight != 0:
        tw = cswt_temperature(s, te, t_min, t_max, eps, valid=valid).unsqueeze(1)
        d = _class_cosine_distance(F.softmax(s / tw, dim=-1), F.softmax(te / tw, dim=-1), w, eps)
        loss = loss + cswt_weight * ((tw.squeeze(1) ** 2) * w).sum() / n * d
    return loss.expand(student_logits.shape[0])


def cskd_loss(student_logits, teacher_logits, temperature, **kwargs) -> torch.Tensor:
    """CSKD batch loss (scalar)."""
    return cskd_loss_per_sample(student_logits, teacher_logits, temperature, **kwargs)[0]


@register_distill_loss('cskd')
class CSKD(DistillLoss):
    """Cosine similarity KD with cosine-similarity-weighted temperature (Ham, Kim et al.).

    The cosine is taken per class between the teacher's and the student's batch predictions (columns of the
    [B, C] probability matrices), so the loss depends on the batch. The fixed-temperature term uses the
    temperature passed by the task (``--kd-temperature``); the CSWT term picks each sample's temperature in
    [t_min, t_max] from the detached per-sample cosine.

    Args:
        t_min: temperature for the batch's most teacher-like sample.
        t_max: temperature for the least teacher-like sample.
        fixed_weight: weight of the fixed-temperature term (authors' code: 2).
        cswt_weight: weight of the CSWT term (authors' code: 2); 0 turns CSWT off.
        eps: added to norm products in the cosines.
        temperature_source: only ``'fixed'``.
    """
    supports_energy_temperature = False

    def __init__(
            self,
            t_min: float = 2.0,
            t_max: float = 6.0,
            fixed_weight: float = 2.0,
            cswt_weight: float = 2.0,
            eps: float = 1e-8,
            temperature_source: str = 'fixed',
    ):
        super().__init__(temperature_source)
        if not 0 < t_min <= t_max:
            raise ValueError(f'cskd: need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}')
        self.t_min = t_min
        self.t_max = t_max
        self.fixed_weight = fixed_weight
        self.cswt_weight = cswt_weight
        self.eps = eps

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        return cskd_loss_per_sample(
            student_logits, teacher_logits, temperature, t_min=self.t_min, t_max=self.t_max,
            fixed_weight=self.fixed_weight, cswt_weight=self.cswt_weight, eps=self.eps, valid=valid,
        )
