"""ReKD (after Xu et al., IEEE TCSVT 2023; our reading): ``rekd`` and ``energy_rekd``.

KD split over [target | the teacher's Top-K non-target classes | the rest]; see docs/LOSSES.md.
"""
from typing import Union

import torch
import torch.nn.functional as F

from .registry import DistillLoss, as_sample_temperature, hard_target, register_distill_loss

__all__ = ['rekd_loss_per_sample', 'ReKD']

Temperature = Union[float, torch.Tensor]


def _group_log_softmax(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of z renormalised over ``mask`` (True = in group); 0 outside it (not -inf, so no NaN grads)."""
    lp = F.log_softmax(z.masked_fill(~mask, float('-inf')), dim=-1)
    return torch.where(mask, lp, torch.zeros_like(lp))


def _group_kl(lp_t: torch.Tensor, lp_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, lp_t.exp() * (lp_t - lp_s), torch.zeros_like(lp_t)).sum(dim=-1)


def rekd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target_idx: torch.Tensor,
        temperature: Temperature,
        k: int = 5,
        tisd_weight: float = 1.0,
        ntid_weight: float = 1.0,
        group_weight: float = 1.0,
        decoupled: bool = True,
) -> torch.Tensor:
    """ReKD per sample (our reading of Xu et al.): KD split over [target | teacher's Top-K | the rest]. Returns [B].

    With p = softmax(z / T_i), S = the K non-target classes of highest teacher probability, R = the other
    non-target classes, b = (p_target, p(S), p(R)) the three group masses and p^S, p^R the distributions
    renormalised inside S and R:

        group = KL(b_t || b_s)        TISD = KL(p_t^S || p_s^S)        NTID = KL(p_t^R || p_s^R)
        loss  = T_i^2 * [group_weight * group + tisd_weight * m_S * TISD + ntid_weight * m_R * NTID]

    where m_S = b_t(S), m_R = b_t(R) if ``decoupled=False`` (then all weights 1 give exactly KD) and
    m_S = m_R = 1 if ``decoupled=True`` (DKD-style: the teacher's confidence no longer damps the terms).
    """
    num_classes = student_logits.shape[-1]
    if not 1 <= k <= num_classes - 2:
        raise ValueError(f'rekd: k must be in [1, num_classes - 2] = [1, {num_classes - 2}], got {k}')
    t = as_sample_temperature(temperature, student_logits)
    zs = student_logits.float() / t
    zt = teacher_logits.float() / t
    gt = F.one_hot(target_idx.long(), num_classes).bool()
    top = zt.detach().masked_fill(gt, float('-inf')).topk(k, dim=-1).indices
    in_top = torch.zeros_like(gt).scatter_(1, top, True)
    rest = ~(gt | in_top)

    # group masses in log space: log b_g = logsumexp over group - logsumexp over all
    def group_log_mass(z):
        groups = torch.stack([z.masked_fill(~m, float('-inf')).logsumexp(-1) for m in (gt, in_top, rest)], -1)
        return groups - z.logsumexp(-1, keepdim=True)

    lb_s, lb_t = group_log_mass(zs), group_log_mass(zt)
    group = (lb_t.exp() * (lb_t - lb_s)).sum(-1)
    tisd = _group_kl(_group_log_softmax(zt, in_top), _group_log_softmax(zs, in_top), in_top)
    ntid = _group_kl(_group_log_softmax(zt, rest), _group_log_softmax(zs, rest), rest)
    if not decoupled:
        mass_t = lb_t.exp()
        tisd = mass_t[:, 1] * tisd
        ntid = mass_t[:, 2] * ntid
    return (group_weight * group + tisd_weight * tisd + ntid_weight * ntid) * t.squeeze(1) ** 2


@register_distill_loss('rekd', energy_name='energy_rekd')
class ReKD(DistillLoss):
    """KD split into Top-K inter-class similar distillation (TISD) and non-Top-K inter-class
    discriminability (NTID), weighted separately (after Xu et al., IEEE TCSVT 2023; our reading).

    The Top-K are the K non-target classes the teacher finds most probable (the target is excluded and
    kept in its own group). Needs class indices: soft targets use their arg-max.

    Args:
        k: number of most similar non-target classes (1 <= k <= num_classes - 2).
        tisd_weight: weight of the Top-K term.
        ntid_weight: weight of the non-Top-K term.
        group_weight: weight of the KL between the three group masses (target / Top-K / rest).
        decoupled: True drops the teacher's group-mass factors from TISD / NTID (DKD-style); False with
            all weights 1 reproduces KD exactly.
        temperature_source: ``'fixed'`` or ``'energy'``.
    """

    def __init__(
            self,
            k: int = 5,
            tisd_weight: float = 1.0,
            ntid_weight: float = 1.0,
            group_weight: float = 1.0,
            decoupled: bool = True,
            temperature_source: str = 'fixed',
    ):
        super().__init__(temperature_source)
        if k < 1:
            raise ValueError(f'rekd: k must be >= 1, got {k}')
        self.k = k
        self.tisd_weight = tisd_weight
        self.ntid_weight = ntid_weight
        self.group_weight = group_weight
        self.decoupled = decoupled

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        return rekd_loss_per_sample(
            student_logits, teacher_logits, hard_target(target), temperature, k=self.k,
            tisd_weight=self.tisd_weight, ntid_weight=self.ntid_weight, group_weight=self.group_weight,
            decoupled=self.decoupled,
        )
