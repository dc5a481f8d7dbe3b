"""High-energy data augmentation (HE-DA): CutMix / MixUp among the teacher's high-energy samples only.

The paper augments only the samples the teacher is unsure about (``E > high``) and distils the student
on the mixed images as an extra term. timm's own ``Mixup`` runs before the task on the whole batch, so
HE-DA runs inside the task, after the teacher's energy pass, with timm's mixup off.

Mixing pairs each selected sample with another selected sample (a random non-zero roll within the
selected set, so nobody is mixed with itself); one ``lam`` per call, as timm does per batch.

``rule='authors'`` reproduces the authors' public code (``energyAUG.py``) instead: the mixed set is batch
samples 0 and 1 followed by every selected sample (so 0 and 1 may appear twice), partners come from
``torch.randperm`` over that set (self-pairs possible), the CutMix box spans ``cut // 2`` on each side of
its centre (an odd side loses a pixel), and MixUp's default alpha is 0.2 (CutMix 1.0). Random draws come in
their order: ``lam`` (numpy), the permutation (torch), then the box centre (numpy).
The arithmetic is in free functions (``sample_lam``, ``cutmix_box``, ``cutmix_images``, ``mixup_images``)
so it can be tested alone. Random numbers come from ``numpy.random`` (seeded by the trainer like timm's
mixup) or from an explicit ``numpy.random.Generator``.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = ['HighEnergyMix', 'MixResult', 'sample_lam', 'cutmix_box', 'cutmix_images', 'mixup_images',
           'mix_targets']

_MODES = ('cutmix', 'mixup')
_SELECTIONS = ('threshold', 'topk')
_RULES = ('paper', 'authors')


def _rng(generator: Optional[np.random.Generator]):
    return generator if generator is not None else np.random


def _randint(rng, low: int, high: int) -> int:
    """Uniform int in [low, high) from a ``numpy.random.Generator`` or the legacy ``numpy.random`` module."""
    return int(rng.integers(low, high)) if hasattr(rng, 'integers') else int(rng.randint(low, high))


def sample_lam(alpha: float, generator: Optional[np.random.Generator] = None) -> float:
    """``lam ~ Beta(alpha, alpha)``."""
    return float(_rng(generator).beta(alpha, alpha))


def cutmix_box(
        h: int,
        w: int,
        lam: float,
        generator: Optional[np.random.Generator] = None,
        rule: str = 'paper',
) -> Tuple[int, int, int, int, float]:
    """A CutMix box for an ``h x w`` image covering about ``1 - lam`` of it.

    The box has side ratio ``sqrt(1 - lam)`` (``cut = int(side * ratio)``) and a uniformly random centre
    (row drawn first), clipped to the image. ``rule='paper'``: ``[c - cut // 2, c + cut // 2 + cut % 2)``, a
    side of ``cut`` before clipping; ``rule='authors'``: ``[c - cut // 2, c + cut // 2)`` as their code.
    Returns ``(y0, y1, x0, x1, lam_adjusted)`` where ``lam_adjusted = 1 - box_area / (h * w)`` is the exact
    fraction of the image left unchanged after clipping.
    """
    if rule not in _RULES:
        raise ValueError(f"rule='{rule}'; expected one of: {', '.join(_RULES)}")
    rng = _rng(generator)
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = _randint(rng, 0, h), _randint(rng, 0, w)
    odd_h, odd_w = (cut_h % 2, cut_w % 2) if rule == 'paper' else (0, 0)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + odd_h, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + odd_w, w)
    lam_adj = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return y0, y1, x0, x1, lam_adj


def cutmix_images(x: torch.Tensor, partner: torch.Tensor, box: Tuple[int, int, int, int]) -> torch.Tensor:
    """Copy of ``x`` [K, C, H, W] with ``box = (y0, y1, x0, x1)`` pasted from ``partner``."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    return out


def mixup_images(x: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * partner``."""
    return x * lam + partner * (1.0 - lam)


def mix_targets(target: torch.Tensor, partner_target: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """Dense ``lam * y + (1 - lam) * y_partner`` for hard [K] or soft [K, C] targets. Returns [K, C] float32."""
    def dense(t):
        return torch.nn.functional.one_hot(t.long(), num_classes).float() if t.ndim == 1 else t.float()
    return dense(target) * lam + dense(partner_target) * (1.0 - lam)


@dataclass
class MixResult:
    """Output of ``HighEnergyMix``.

    Attributes:
        index: [K] batch indices of the mixed samples (K = 0 when nothing was mixed).
        partner: [K] batch indices of the samples pasted / blended into them.
        mixed: [K, C, H, W] mixed images.
        lam: Fraction of each mixed image coming from ``index`` (one float per call).
        fraction: 0-d float32 tensor, K / B.
    """
    index: torch.Tensor
    partner: torch.Tensor
    mixed: torch.Tensor
    lam: Union[float, torch.Tensor]
    fraction: torch.Tensor

    @property
    def num_mixed(self) -> int:
        return self.index.numel()


class HighEnergyMix:
    """HE-DA: mix only the high-energy samples of a batch, among themselves.

    Args:
        mode: ``'cutmix'`` (paper default) or ``'mixup'``.
        alpha: Beta(alpha, alpha) parameter for ``lam``; None: 1.0, except MixUp under ``rule='authors'``
            (0.2, their code).
        selection: ``'threshold'``: the samples with ``E > high`` (paper). K is data dependent, so the
            selection syncs the host once per step (``nonzero``) to size the output; the task's student
            batch changes shape accordingly. ``'topk'``: the ``ceil(rate * B)`` highest-energy samples,
            a fixed shape and no host sync (friendlier to ``torch.compile`` / CUDA graphs).
        rate: Fraction of the batch for ``'topk'`` (required there, in (0, 1]).
        min_samples: With fewer selected samples nothing is mixed (K = 0); at least 2.
        generator: Optional ``numpy.random.Generator``; default: the global ``numpy.random`` state.
        rule: ``'paper'`` (default) or ``'authors'`` (see the module docstring; needs ``selection='threshold'``).
        torch_generator: ``torch.Generator`` for the authors' ``randperm``; default: torch's global state.
    """

    def __init__(
            self,
            mode: str = 'cutmix',
            alpha: Optional[float] = None,
            selection: str = 'threshold',
            rate: Optional[float] = None,
            min_samples: int = 2,
            generator: Optional[np.random.Generator] = None,
            rule: str = 'paper',
            torch_generator: Optional[torch.Generator] = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode='{mode}' is not supported; expected one of: {', '.join(_MODES)}")
        if selection not in _SELECTIONS:
            raise ValueError(f"selection='{selection}' is not supported; expected one of: {', '.join(_SELECTIONS)}")
        if rule not in _RULES:
            raise ValueError(f"rule='{rule}' is not supported; expected one of: {', '.join(_RULES)}")
        if rule == 'authors' and selection != 'threshold':
            raise ValueError("rule='authors' selects by threshold (their code); selection='topk' is ours")
        if alpha is None:
            alpha = 0.2 if (rule == 'authors' and mode == 'mixup') else 1.0
        if alpha <= 0:
            raise ValueError(f'alpha={alpha}; the Beta distribution needs alpha > 0')
        if selection == 'topk' and (rate is None or not (0.0 < rate <= 1.0)):
            raise ValueError(f"rate={rate}; selection='topk' needs 0 < rate <= 1")
        if min_samples < 2:
            raise ValueError(f'min_samples={min_samples}; mixing needs at least 2 samples')
        self.mode = mode
        self.alpha = float(alpha)
        self.selection = selection
        self.rate = rate
        self.min_samples = int(min_samples)
        self.generator = generator
        self.rule = rule
        self.torch_generator = torch_generator

    def select(self, energy: torch.Tensor, high: Union[float, torch.Tensor]) -> torch.Tensor:
        """[K] batch indices of the samples to mix (empty when fewer than ``min_samples``)."""
        b = energy.shape[0]
        if self.selection == 'topk':
            k = int(math.ceil(self.rate * b - 1e-9))
            if k < self.min_samples:
                return torch.zeros(0, dtype=torch.long, device=energy.device)
            return torch.topk(energy.detach().float(), k).indices
        high = torch.as_tensor(high, dtype=torch.float32, device=energy.device)
        # host sync: K is data dependent and sizes the mixed batch
        index = torch.nonzero(energy.detach().float() > high).squeeze(1)
        if index.numel() < self.min_samples:
            return index[:0]
        return index

    def _authors_mix(self, x: torch.Tensor, energy: torch.Tensor, high) -> MixResult:
        """The authors' rule: set = [0, 1] + selected, randperm partners, lam, then the box."""
        b = x.shape[0]
        high = torch.as_tensor(high, dtype=torch.float32, device=energy.device)
        chosen = torch.nonzero(energy.detach().float() > high).squeeze(1)
        index = torch.cat([torch.arange(min(2, b), device=x.device), chosen.to(x.device)])
        k = index.numel()
        rng = _rng(self.generator)
        lam = sample_lam(self.alpha, self.generator)
        perm = torch.randperm(k, generator=self.torch_generator).to(index.device)
        partner = index.index_select(0, perm)
        x_sel, x_par = x.index_select(0, index), x.index_select(0, partner)
        if self.mode == 'cutmix':
            y0, y1, x0, x1, lam = cutmix_box(x.shape[-2], x.shape[-1], lam, rng, rule='authors')
            mixed = cutmix_images(x_sel, x_par, (y0, y1, x0, x1))
        else:
            mixed = mixup_images(x_sel, x_par, lam)
        return MixResult(index=index, partner=partner, mixed=mixed, lam=lam,
                         fraction=torch.full((), k / b, dtype=torch.float32, device=x.device))

    def __call__(self, x: torch.Tensor, energy: torch.Tensor, high: Union[float, torch.Tensor]) -> MixResult:
        b = x.shape[0]
        if self.rule == 'authors':
            return self._authors_mix(x, energy, high)
        index = self.select(energy, high)
        k = index.numel()
        if k == 0:
            return MixResult(
                index=index, partner=index, mixed=x[:0], lam=1.0,
                fraction=torch.zeros((), dtype=torch.float32, device=x.device))
        rng = _rng(self.generator)
        shift = _randint(rng, 1, k)  # non-zero roll: every sample gets another selected sample
        partner = torch.roll(index, shifts=shift)
        lam = sample_lam(self.alpha, self.generator)
        x_sel, x_par = x.index_select(0, index), x.index_select(0, partner)
        if self.mode == 'cutmix':
            y0, y1, x0, x1, lam = cutmix_box(x.shape[-2], x.shape[-1], lam, self.generator)
            mixed = cutmix_images(x_sel, x_par, (y0, y1, x0, x1))
        else:
            mixed = mixup_images(x_sel, x_par, lam)
        return MixResult(
            index=index, partner=partner, mixed=mixed, lam=lam,
            fraction=torch.full((), k / b, dtype=torch.float32, device=x.device))

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(mode={self.mode}, alpha={self.alpha}, selection={self.selection}, '
                f'rate={self.rate}, min_samples={self.min_samples}, rule={self.rule})')
