"""R2KD (Kim, Ham, Cho and Kim, IEEE TKDE 2024): ``r2kd`` and ``energy_r2kd``.

Value term ``2 T^2 [(1 - |cos| per sample) + (1 - mean |cos| per class over the batch)]`` and a rank term
(Spearman of the probabilities), as in the authors' public code; the rank term is made trainable with soft
ranks by default. The published teacher blend (0.7 teacher + 0.3 pruned teacher) is teacher-side:
``timm_energykd.teacher.BlendedTeacher``.
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .registry import DistillLoss, as_sample_temperature, register_distill_loss, valid_weights

__all__ = ['cosine', 'r2kd_loss_per_sample', 'r2kd_loss', 'R2KD']

_METRICS = ('abs_cosine', 'pearson')
_RANK_MODES = ('soft', 'hard', 'none')


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """Uncentred cosine similarity of ``a`` and ``b`` along ``dim`` (``eps`` added to the norm product)."""
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def _soft_rank(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Differentiable 1-based ranks along the last dim: 0.5 + sum_j sigmoid((x_i - x_j) / tau).

    Tends to the hard rank (ascending, 1 = smallest) as tau -> 0. Costs a [B, C, C] tensor.
    """
    return 0.5 + torch.sigmoid((x.unsqueeze(-1) - x.unsqueeze(-2)) / tau).sum(dim=-1)


def _hard_rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1).argsort(dim=-1).to(x.dtype) + 1


def _check(value_metric: str, rank_mode: str) -> None:
    if value_metric not in _METRICS:
        raise ValueError(f"r2kd: value_metric must be 'abs_cosine' or 'pearson', got {value_metric!r}")
    if rank_mode not in _RANK_MODES:
        raise ValueError(f"r2kd: rank_mode must be 'soft', 'hard' or 'none', got {rank_mode!r}")


def r2kd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Union[float, torch.Tensor],
        value_weight: float = 2.0,
        rank_weight: float = 2.0,
        value_metric: str = 'abs_cosine',
        rank_mode: str = 'soft',
        rank_tau: float = 0.1,
        eps: float = 1e-8,
        valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """R2KD per row [B] between tempered probabilities p = softmax(z / T_i); the mean over the valid rows is
    the loss of those rows alone:

        row_i = value_weight * [T_i^2 (1 - sim(p_s,i, p_t,i)) + mean_valid(T^2) (1 - mean_c sim(P_s[:, c], P_t[:, c]))]
                + rank_weight * (1 - spearman(p_s,i, p_t,i))

    ``sim`` is ``|cos|`` (``value_metric='abs_cosine'``, the authors' code) or Pearson correlation
    (``'pearson'``: centred, no absolute value). The per-class term uses the valid rows only. ``rank_mode``:
    'soft' (student ranks from a sigmoid soft-rank, trainable; teacher ranks exact), 'hard' (argsort for both,
    as published: a value with no gradient), 'none'.
    """
    _check(value_metric, rank_mode)
    t = as_sample_temperature(temperature, student_logits)
    t2 = t.squeeze(1) ** 2
    w = valid_weights(valid, student_logits)
    n = w.sum().clamp(min=1.0)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()

    def row_sim(a, b):
        if value_metric == 'pearson':
            return cosine(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), 1, eps)
        return cosine(a, b, 1, eps).abs()

    def class_sim(a, b):
        wc = w.unsqueeze(1)
        if value_metric == 'pearson':  # centre each column over the valid rows
            a = a - (a * wc).sum(0, keepdim=True) / n
            b = b - (b * wc).sum(0, keepdim=True) / n
        s = cosine(a * wc, b * wc, 0, eps)  # zeroed rows leave both dot product and norms
        return s if value_metric == 'pearson' else s.abs()

    class_term = (t2 * w).sum() / n * (1 - class_sim(p_s, p_t).mean())
    out = value_weight * (t2 * (1 - row_sim(p_s, p_t)) + class_term)
    if rank_mode != 'none' and rank_weight != 0:
        # ranks of p equal ranks of log p; log p differences are (z_i - z_j) / T, a well-scaled soft-rank input
        r_t = _hard_rank(log_p_t.detach())
        r_s = _soft_rank(log_p_s, rank_tau) if rank_mode == 'soft' else _hard_rank(log_p_s.detach())
        r_s = r_s - r_s.mean(dim=1, keepdim=True)
        r_t = r_t - r_t.mean(dim=1, keepdim=True)
        out = out + rank_weight * (1 - cosine(r_s, r_t, 1, eps))
    return out


def r2kd_loss(student_logits, teacher_logits, temperature, **kwargs) -> torch.Tensor:
    """R2KD batch loss (scalar): the mean of ``r2kd_loss_per_sample``."""
    return r2kd_loss_per_sample(student_logits, teacher_logits, temperature, **kwargs).mean()


@register_distill_loss('r2kd', energy_name='energy_r2kd')
class R2KD(DistillLoss):
    """Robustness-reinforced KD with correlation distance; rank term made trainable.

    Takes already blended teacher logits: wrap the teacher in ``teacher.BlendedTeacher`` for the published
    targets. Published temperature 4 (``--kd-temperature 4``). With ``energy_r2kd`` each sample's
    probabilities use its own T_i, the per-sample distance is scaled by T_i^2 and the per-class distance by
    mean_i T_i^2.

    Args:
        value_weight: weight of the value (correlation-distance) term, times T^2 (2.0 published).
        rank_weight: weight of the rank (Spearman) term, not scaled by T^2 (2.0 published).
        value_metric: 'abs_cosine' (authors' code) or 'pearson'.
        rank_mode: 'soft' (default), 'hard' (published argsort: a value but no gradient), 'none'.
        rank_tau: soft-rank sharpness on log-probability differences.
        eps: added to norm products in the cosines.
        temperature_source: ``'fixed'`` or ``'energy'``.
    """

    def __init__(
            self,
            value_weight: float = 2.0,
            rank_weight: float = 2.0,
            value_metric: str = 'abs_cosine',
            rank_mode: str = 'soft',
            rank_tau: float = 0.1,
            eps: float = 1e-8,
            temperature_source: str = 'fixed',
    ):
        super().__init__(temperature_source)
        _check(value_metric, rank_mode)
        if rank_tau <= 0:
            raise ValueError(f'r2kd: rank_tau must be > 0, got {rank_tau}')
        self.value_weight = value_weight
        self.rank_weight = rank_weight
        self.value_metric = value_metric
        self.rank_mode = rank_mode
        self.rank_tau = rank_tau
        self.eps = eps

    def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None) -> torch.Tensor:
        return r2kd_loss_per_sample(
            student_logits, teacher_logits, temperature,
            value_weight=self.value_weight, rank_weight=self.rank_weight, value_metric=self.value_metric,
            rank_mode=self.rank_mode, rank_tau=self.rank_tau, eps=self.eps, valid=valid,
        )
