"""Logit standardisation (Sun et al., CVPR 2024): KD+LS (``kd_ls``, ``energy_kd_ls``) and DKD+LS (``dkd_ls``).

Both are the base loss on z-scored logits: ``prepare_logits`` standardises each row, everything else
(DKD's warm-up included) is inherited from ``KDLoss`` / ``DKDLoss``.

The official repository (sunshangquan/logit-standardization-KD, ``tools/train.py`` with ``--logit-stand
--base-temp 2 --kd-weight 9``; its ``mdistiller/engine/cfg.py`` defaults) trains KD+LS with T = 2, KD weight 9,
CE weight 0.1, and DKD+LS with T = 2, alpha = 1 * 9, beta = 8 * 9 = 72, CE weight 1 (docs/FIDELITY.md).
"""
import torch

from .dkd import DKDLoss
from .kd import KDLoss
from .registry import register_distill_loss

__all__ = ['standardize_logits', 'KDLS', 'DKDLS']


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7, correction: int = 1) -> torch.Tensor:
    """Z-score each row of ``logits`` in float32: (z - mean) / (std + eps).

    ``correction=1`` is the unbiased (N-1) standard deviation, ``torch.std``'s default, which is what the
    LS-KD authors' code uses; 0 gives the population std.
    """
    z = logits.float()
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=correction)
    return (z - mean) / (std + eps)


class _Standardized:
    """Mixin: standardise both logit tensors before the base loss."""

    def _init_ls(self, eps: float, std_correction: int) -> None:
        self.eps = float(eps)
        self.std_correction = int(std_correction)

    def prepare_logits(self, student_logits, teacher_logits):
        return (standardize_logits(student_logits, self.eps, self.std_correction),
                standardize_logits(teacher_logits, self.eps, self.std_correction))


@register_distill_loss('kd_ls', energy_name='energy_kd_ls')
class KDLS(_Standardized, KDLoss):
    """KD on standardised logits: KL(softmax(zt'/T) || softmax(zs'/T)) * T^2.

    Args:
        eps: added to the per-sample standard deviation (1e-7 in the paper and code).
        std_correction: 1 for the unbiased std (the authors' code), 0 for the population std.
        temperature_source: ``'fixed'`` or ``'energy'``.
    """

    def __init__(self, eps: float = 1e-7, std_correction: int = 1, temperature_source: str = 'fixed'):
        super().__init__(temperature_source)
        self._init_ls(eps, std_correction)


@register_distill_loss('dkd_ls')
class DKDLS(_Standardized, DKDLoss):
    """DKD on standardised logits; DKD's options (alpha, beta, warm-up and its mode) are inherited.

    Args:
        alpha, beta, warmup_epochs, warmup_mode: as ``DKDLoss``.
        eps: added to the per-sample standard deviation.
        std_correction: 1 for the unbiased std (the authors' code), 0 for the population std.
        temperature_source: ``'fixed'`` (the name ``dkd_ls``) or ``'energy'``.
    """

    def __init__(
            self,
            alpha: float = 1.0,
            beta: float = 8.0,
            warmup_epochs: float = 20,
            warmup_mode: str = 'mdistiller',
            eps: float = 1e-7,
            std_correction: int = 1,
            temperature_source: str = 'fixed',
    ):
        super().__init__(alpha, beta, warmup_epochs, warmup_mode, temperature_source)
        self._init_ls(eps, std_correction)
