"""Peer logit-distillation losses in the shared loss registry.

Registered here (see docs/LOSSES.md for each paper's reading, defaults and published numbers):

    kd_ls, dkd_ls, energy_kd_ls   logit standardisation (Sun et al., CVPR 2024)
    wttm, energy_wttm             weighted transformed teacher matching (Zheng & Yang, ICLR 2024)
    r2kd, energy_r2kd             correlation-distance KD (Kim et al., R2KD), plus the pruned-teacher blend
                                  helpers ``make_pruned_teacher`` and ``BlendedTeacher``
    rekd, energy_rekd             Top-K similar / non-Top-K split of KD (Xu et al., TCSVT 2023; our reading)
    cskd                          cosine similarity KD with cosine-similarity-weighted temperature (Ham et al.)

Every loss follows the contract of ``losses.py``: ``forward(student_logits, teacher_logits, target, temperature)``
returns a scalar batch mean, computes in float32 whatever the input dtype, accepts a float or a [B] tensor
temperature, and makes no host-device sync. The ``energy_*`` variants only differ by
``uses_energy_temperature = True`` (the task then passes the energy policy's per-sample temperatures).
"""
import copy
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from .losses import DistillLoss, as_sample_temperature, hard_target, kd_loss_per_sample, register_distill_loss

__all__ = [
    'standardize_logits', 'wttm_loss_per_sample', 'r2kd_loss', 'rekd_loss_per_sample', 'cskd_loss',
    'cswt_temperature', 'make_pruned_teacher', 'BlendedTeacher',
    'KDLS', 'EnergyKDLS', 'DKDLS', 'WTTM', 'EnergyWTTM', 'R2KD', 'EnergyR2KD', 'ReKD', 'EnergyReKD', 'CSKD',
]

Temperature = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Logit standardisation (LS)
# --------------------------------------------------------------------------------------------------------------

def standardize_logits(logits: torch.Tensor, eps: float = 1e-7, correction: int = 1) -> torch.Tensor:
    """Z-score each row of ``logits`` in float32: (z - mean) / (std + eps).

    ``correction=1`` is the unbiased (N-1) standard deviation, ``torch.std``'s default, which is what the
    LS-KD authors' code uses; 0 gives the population std.
    """
    z = logits.float()
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=correction)
    return (z - mean) / (std + eps)


@register_distill_loss('kd_ls')
class KDLS(DistillLoss):
    """KD on standardised logits (KD+LS, Sun et al., CVPR 2024): KL(softmax(zt'/T) || softmax(zs'/T)) * T^2.

    Their CIFAR recipe: base T 2 and KD weight 9 (``--kd-temperature 2 --distill-loss-weight 9
    --task-loss-weight 1``).

    Args:
        eps: added to the per-sample standard deviation (1e-7 in the paper).
        std_correction: 1 for the unbiased std (authors' code), 0 for the population std.
    """

    def __init__(self, eps: float = 1e-7, std_correction: int = 1):
        super().__init__()
        self.eps = eps
        self.std_correction = std_correction

    def forward(self, student_logits, teacher_logits, target, temperature):
        s = standardize_logits(student_logits, self.eps, self.std_correction)
        t = standardize_logits(teacher_logits, self.eps, self.std_correction)
        return kd_loss_per_sample(s, t, temperature).mean()


@register_distill_loss('energy_kd_ls')
class EnergyKDLS(KDLS):
    """KD+LS with the energy policy's per-sample temperatures (same args as ``kd_ls``)."""
    uses_energy_temperature = True


@register_distill_loss('dkd_ls')
class DKDLS(DistillLoss):
    """DKD on standardised logits (DKD+LS, Sun et al., CVPR 2024).

    Uses the core ``dkd_loss_per_sample`` of ``losses.py`` on z-scored logits. The DKD warm-up (loss scaled
    by min(epoch / warmup_epochs, 1), as in DKD) follows ``set_progress``.

    Args:
        alpha: weight of the target-class term (TCKD), 1.0 in DKD.
        beta: weight of the non-target term (NCKD), 8.0 in DKD for ResNet32x4->ResNet8x4.
        warmup_epochs: linear warm-up length in epochs (20 in DKD); 0 disables it.
        eps: added to the per-sample standard deviation.
        std_correction: 1 for the unbiased std (authors' code), 0 for the population std.
    """

    def __init__(
            self,
            alpha: float = 1.0,
            beta: float = 8.0,
            warmup_epochs: float = 20.0,
            eps: float = 1e-7,
            std_correction: int = 1,
    ):
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f'dkd_ls: warmup_epochs must be >= 0, got {warmup_epochs}')
        self.alpha = alpha
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        self.eps = eps
        self.std_correction = std_correction
        self.warmup_factor = 1.0 if warmup_epochs == 0 else 0.0

    def set_progress(self, epoch: float) -> None:
        self.warmup_factor = 1.0 if self.warmup_epochs == 0 else min(float(epoch) / self.warmup_epochs, 1.0)

    def forward(self, student_logits, teacher_logits, target, temperature):
        from .losses import dkd_loss_per_sample  # provided by the core DKD work in losses.py
        s = standardize_logits(student_logits, self.eps, self.std_correction)
        t = standardize_logits(teacher_logits, self.eps, self.std_correction)
        loss = dkd_loss_per_sample(s, t, hard_target(target), temperature, alpha=self.alpha, beta=self.beta)
        return self.warmup_factor * loss.mean()


# --------------------------------------------------------------------------------------------------------------
# WTTM
# --------------------------------------------------------------------------------------------------------------

def wttm_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        gamma: Temperature,
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


@register_distill_loss('wttm')
class WTTM(DistillLoss):
    """Weighted transformed teacher matching (Zheng & Yang, ICLR 2024).

    loss = mean_i U_gamma(p_t,i) * KL(p_t,i^gamma / U || softmax(s_i)), gamma = 1 / temperature unless
    ``gamma`` is given. Their beta multiplier is the trainer's ``--distill-loss-weight`` (e.g. gamma 0.1,
    beta 100 as we read their CIFAR ResNet32x4->ResNet8x4 table; see docs/LOSSES.md).

    Args:
        gamma: fixed power (0 < gamma <= 1); None (default) uses 1 / temperature as passed by the task.
        weighted: False gives plain TTM (no sample-adaptive weight).
    """

    def __init__(self, gamma: Optional[float] = None, weighted: bool = True):
        super().__init__()
        if gamma is not None and not 0 < gamma <= 1:
            raise ValueError(f'wttm: gamma must be in (0, 1], got {gamma}')
        self.gamma = gamma
        self.weighted = weighted

    def forward(self, student_logits, teacher_logits, target, temperature):
        gamma = self.gamma if self.gamma is not None else 1.0 / as_sample_temperature(temperature, student_logits)
        return wttm_loss_per_sample(student_logits, teacher_logits, gamma, self.weighted).mean()


@register_distill_loss('energy_wttm')
class EnergyWTTM(WTTM):
    """WTTM with a per-sample power gamma_i = 1 / T_i from the energy policy's temperatures.

    Args:
        weighted: False gives plain TTM.
    """
    uses_energy_temperature = True

    def __init__(self, weighted: bool = True):
        super().__init__(gamma=None, weighted=weighted)


# --------------------------------------------------------------------------------------------------------------
# R2KD
# --------------------------------------------------------------------------------------------------------------

def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def _soft_rank(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Differentiable 1-based ranks along the last dim: 0.5 + sum_j sigmoid((x_i - x_j) / tau).

    Tends to the hard rank (ascending, 1 = smallest) as tau -> 0. Costs a [B, C, C] tensor.
    """
    return 0.5 + torch.sigmoid((x.unsqueeze(-1) - x.unsqueeze(-2)) / tau).sum(dim=-1)


def _hard_rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1).argsort(dim=-1).to(x.dtype) + 1


def r2kd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Temperature,
        value_weight: float = 2.0,
        rank_weight: float = 2.0,
        value_metric: str = 'abs_cosine',
        rank_mode: str = 'soft',
        rank_tau: float = 0.1,
        eps: float = 1e-8,
) -> torch.Tensor:
    """R2KD loss (scalar) between tempered probabilities p = softmax(z / T_i).

    value = value_weight * [mean_i T_i^2 (1 - |cos(p_s,i, p_t,i)|) + mean_i(T_i^2) (1 - mean_c |cos(P_s[:, c], P_t[:, c])|)]
    rank  = rank_weight * (1 - mean_i spearman(p_s,i, p_t,i))

    With a scalar T the value term is value_weight * T^2 * [per-sample + per-class distance] as published.
    ``value_metric='pearson'`` uses 1 - Pearson correlation (vectors centred, no absolute value) instead of
    1 - |cos|. ``rank_mode``: 'soft' (student ranks from a sigmoid soft-rank, trainable; teacher ranks exact),
    'hard' (argsort for both, as published: a value with no gradient), 'none' (no rank term).
    """
    if value_metric not in ('abs_cosine', 'pearson'):
        raise ValueError(f"r2kd: value_metric must be 'abs_cosine' or 'pearson', got {value_metric!r}")
    if rank_mode not in ('soft', 'hard', 'none'):
        raise ValueError(f"r2kd: rank_mode must be 'soft', 'hard' or 'none', got {rank_mode!r}")
    t = as_sample_temperature(temperature, student_logits)
    t2 = t.squeeze(1) ** 2
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()

    def similarity(a, b, dim):
        if value_metric == 'pearson':
            a = a - a.mean(dim=dim, keepdim=True)
            b = b - b.mean(dim=dim, keepdim=True)
            return _cosine(a, b, dim, eps)
        return _cosine(a, b, dim, eps).abs()

    sample_term = (t2 * (1 - similarity(p_s, p_t, dim=1))).mean()
    class_term = t2.mean() * (1 - similarity(p_s, p_t, dim=0).mean())
    loss = value_weight * (sample_term + class_term)

    if rank_mode != 'none' and rank_weight != 0:
        # ranks of p equal ranks of log p; log p differences are (z_i - z_j) / T, a well-scaled soft-rank input
        r_t = _hard_rank(log_p_t.detach())
        r_s = _soft_rank(log_p_s, rank_tau) if rank_mode == 'soft' else _hard_rank(log_p_s.detach())
        r_s = r_s - r_s.mean(dim=1, keepdim=True)
        r_t = r_t - r_t.mean(dim=1, keepdim=True)
        loss = loss + rank_weight * (1 - _cosine(r_s, r_t, 1, eps).mean())
    return loss


@register_distill_loss('r2kd')
class R2KD(DistillLoss):
    """Robustness-reinforced KD with correlation distance (Kim et al., R2KD); rank term made trainable.

    Takes already blended teacher logits: wrap the teacher in ``BlendedTeacher`` for the published
    0.7 * teacher + 0.3 * pruned-teacher targets. Published temperature 4 (``--kd-temperature 4``).

    Args:
        value_weight: weight of the value (correlation-distance) term, times T^2 (2.0 published).
        rank_weight: weight of the rank (Spearman) term, not scaled by T^2 (2.0 published).
        value_metric: 'abs_cosine' (authors' code: 1 - |cos| of raw probabilities) or 'pearson'
            (1 - Pearson correlation).
        rank_mode: 'soft' (default; differentiable soft ranks for the student), 'hard' (published argsort,
            contributes a value but no gradient), 'none'.
        rank_tau: soft-rank sharpness on log-probability differences (smaller = closer to hard ranks).
        eps: added to norm products in the cosines.
    """

    def __init__(
            self,
            value_weight: float = 2.0,
            rank_weight: float = 2.0,
            value_metric: str = 'abs_cosine',
            rank_mode: str = 'soft',
            rank_tau: float = 0.1,
            eps: float = 1e-8,
    ):
        super().__init__()
        if value_metric not in ('abs_cosine', 'pearson'):
            raise ValueError(f"r2kd: value_metric must be 'abs_cosine' or 'pearson', got {value_metric!r}")
        if rank_mode not in ('soft', 'hard', 'none'):
            raise ValueError(f"r2kd: rank_mode must be 'soft', 'hard' or 'none', got {rank_mode!r}")
        if rank_tau <= 0:
            raise ValueError(f'r2kd: rank_tau must be > 0, got {rank_tau}')
        self.value_weight = value_weight
        self.rank_weight = rank_weight
        self.value_metric = value_metric
        self.rank_mode = rank_mode
        self.rank_tau = rank_tau
        self.eps = eps

    def forward(self, student_logits, teacher_logits, target, temperature):
        return r2kd_loss(
            student_logits, teacher_logits, temperature,
            value_weight=self.value_weight, rank_weight=self.rank_weight, value_metric=self.value_metric,
            rank_mode=self.rank_mode, rank_tau=self.rank_tau, eps=self.eps,
        )


@register_distill_loss('energy_r2kd')
class EnergyR2KD(R2KD):
    """R2KD with the energy policy's per-sample temperatures (same args as ``r2kd``).

    Each sample's probabilities use its own T_i; the per-sample distance is scaled by T_i^2 and the
    per-class (batch) distance by mean_i T_i^2.
    """
    uses_energy_temperature = True


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


# --------------------------------------------------------------------------------------------------------------
# ReKD (our reading; see docs/LOSSES.md)
# --------------------------------------------------------------------------------------------------------------

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


@register_distill_loss('rekd')
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
    """

    def __init__(
            self,
            k: int = 5,
            tisd_weight: float = 1.0,
            ntid_weight: float = 1.0,
            group_weight: float = 1.0,
            decoupled: bool = True,
    ):
        super().__init__()
        if k < 1:
            raise ValueError(f'rekd: k must be >= 1, got {k}')
        self.k = k
        self.tisd_weight = tisd_weight
        self.ntid_weight = ntid_weight
        self.group_weight = group_weight
        self.decoupled = decoupled

    def forward(self, student_logits, teacher_logits, target, temperature):
        return rekd_loss_per_sample(
            student_logits, teacher_logits, hard_target(target), temperature, k=self.k,
            tisd_weight=self.tisd_weight, ntid_weight=self.ntid_weight, group_weight=self.group_weight,
            decoupled=self.decoupled,
        ).mean()


@register_distill_loss('energy_rekd')
class EnergyReKD(ReKD):
    """ReKD with the energy policy's per-sample temperatures (same args as ``rekd``)."""
    uses_energy_temperature = True


# --------------------------------------------------------------------------------------------------------------
# CSKD + CSWT
# --------------------------------------------------------------------------------------------------------------

def _class_cosine_distance(p_s: torch.Tensor, p_t: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over classes c of (1 - cos(P_s[:, c], P_t[:, c])): columns are the batch predictions per class."""
    return (1 - _cosine(p_s, p_t, 0, eps)).mean()


def cswt_temperature(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        t_min: float = 2.0,
        t_max: float = 6.0,
        eps: float = 1e-8,
) -> torch.Tensor:
    """Cosine-similarity-weighted temperature per sample, [B], no gradient.

    cs_i = cos(softmax(s_i), softmax(t_i)); the batch's most similar sample gets t_min, the least similar
    t_max, linearly in between: T_i = t_min + (t_max - t_min) * (max cs - cs_i) / (max cs - min cs).
    A batch where all cs_i are equal gets t_min everywhere.
    """
    with torch.no_grad():
        p_s = F.softmax(student_logits.detach().float(), dim=-1)
        p_t = F.softmax(teacher_logits.detach().float(), dim=-1)
        cs = _cosine(p_s, p_t, 1, eps)
        cs_max, cs_min = cs.max(), cs.min()
        frac = (cs_max - cs) / (cs_max - cs_min).clamp_min(eps)
        return t_min + (t_max - t_min) * frac


def cskd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Temperature,
        t_min: float = 2.0,
        t_max: float = 6.0,
        fixed_weight: float = 2.0,
        cswt_weight: float = 2.0,
        eps: float = 1e-8,
) -> torch.Tensor:
    """CSKD (scalar): class-wise cosine distance of batch predictions at the base T plus at CSWT temperatures.

    loss = fixed_weight * mean(T^2) * D(T) + cswt_weight * mean(T_i'^2) * D(T')
    with D(T) = mean_c (1 - cos(P_s[:, c], P_t[:, c])), P = softmax(z / T) row-wise, T' from ``cswt_temperature``.
    """
    t = as_sample_temperature(temperature, student_logits)
    s, te = student_logits.float(), teacher_logits.float()
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if fixed_weight != 0:
        d = _class_cosine_distance(F.softmax(s / t, dim=-1), F.softmax(te / t, dim=-1), eps)
        loss = loss + fixed_weight * (t.squeeze(1) ** 2).mean() * d
    if cswt_weight != 0:
        tw = cswt_temperature(s, te, t_min, t_max, eps).unsqueeze(1)
        d = _class_cosine_distance(F.softmax(s / tw, dim=-1), F.softmax(te / tw, dim=-1), eps)
        loss = loss + cswt_weight * (tw.squeeze(1) ** 2).mean() * d
    return loss


@register_distill_loss('cskd')
class CSKD(DistillLoss):
    """Cosine similarity KD with cosine-similarity-weighted temperature (Ham, Kim et al.).

    The cosine is taken per class between the teacher's and the student's batch predictions (columns of
    the [B, C] probability matrices), so the loss depends on the batch (and its size), not on samples
    one by one. The fixed-temperature term uses the temperature passed by the task (``--kd-temperature``);
    the CSWT term picks each sample's temperature in [t_min, t_max] from the detached per-sample cosine.

    Args:
        t_min: temperature for the batch's most teacher-like sample.
        t_max: temperature for the least teacher-like sample.
        fixed_weight: weight of the fixed-temperature term (authors' code: 2).
        cswt_weight: weight of the CSWT term (authors' code: 2); 0 turns CSWT off.
        eps: added to norm products in the cosines.
    """

    def __init__(
            self,
            t_min: float = 2.0,
            t_max: float = 6.0,
            fixed_weight: float = 2.0,
            cswt_weight: float = 2.0,
            eps: float = 1e-8,
    ):
        super().__init__()
        if not 0 < t_min <= t_max:
            raise ValueError(f'cskd: need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}')
        self.t_min = t_min
        self.t_max = t_max
        self.fixed_weight = fixed_weight
        self.cswt_weight = cswt_weight
        self.eps = eps

    def forward(self, student_logits, teacher_logits, target, temperature):
        return cskd_loss(
            student_logits, teacher_logits, temperature, t_min=self.t_min, t_max=self.t_max,
            fixed_weight=self.fixed_weight, cswt_weight=self.cswt_weight, eps=self.eps,
        )
