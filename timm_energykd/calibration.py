"""The paper's threshold pass as one call: load the cache if its identity matches, else calibrate and save.

Kim et al. (Eq. 9/11) fix the energy thresholds once, from one no-grad teacher pass over the training set.
``calibrate_or_load`` is that step for any training loop (our trainer, or a user's own timm loop):

    cal = calibrate_or_load(task.teacher_logits, loader, rate=0.2, cache='out/energy_thresholds.json',
                            identity={'teacher': 'resnet50', 'data': '/imagenet', 'num_samples': len(ds)})
    task.set_thresholds(cal.thresholds, cal.he_da_thresholds)

The teacher is only a function from images to logits, so the task, the trainer and a user's loop call it the
same way. Under ``torch.distributed`` each rank passes its own share of the samples; energies are gathered,
so every rank gets the single-process thresholds over the union. Only ``save=True`` (rank 0) writes.
"""
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from .energy import EnergyThresholds, calibrate_thresholds

__all__ = ['Calibration', 'calibrate_or_load', 'he_da_cache_path', 'check_threshold_values']

_logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Thresholds of one run: the main ones (rate r) and, when HE-DA selects at another rate, its own."""
    thresholds: EnergyThresholds
    he_da_thresholds: Optional[EnergyThresholds] = None
    from_cache: bool = False


def he_da_cache_path(cache: str) -> str:
    """Where the HE-DA thresholds of ``cache`` live (beside it, same identity but the HE-DA rate)."""
    return os.path.splitext(cache)[0] + '_he_da.json'


def check_threshold_values(thresholds: EnergyThresholds, source: str) -> EnergyThresholds:
    """Refuse thresholds that would make Energy KD degenerate silently (NaN, inf, or low above high)."""
    low, high = float(thresholds.low), float(thresholds.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f'{source}: energy thresholds are not finite (low={low}, high={high}); '
                         'delete it to recalibrate')
    if low > high:
        raise ValueError(f'{source}: low threshold {low} is above high threshold {high}; delete it to recalibrate')
    edges = list(getattr(thresholds, 'bin_edges', None) or [])
    if any(not math.isfinite(float(e)) for e in edges) or edges != sorted(edges):
        raise ValueError(f'{source}: energy bin edges are not finite and ascending; delete it to recalibrate')
    return thresholds


def _load(path: str, identity: Dict[str, Any]) -> EnergyThresholds:
    return check_threshold_values(EnergyThresholds.load_json(path, expect_identity=identity), f'calibration cache {path}')


def calibrate_or_load(
        teacher_fn: Callable[[torch.Tensor], torch.Tensor],
        loader: Iterable,
        rate: float,
        cache: Optional[str] = None,
        identity: Optional[Dict[str, Any]] = None,
        energy_temperature: float = 4.0,
        num_bins: int = 10,
        he_da_rate: Optional[float] = None,
        device: Optional[torch.device] = None,
        amp_dtype: Optional[torch.dtype] = None,
        save: bool = True,
        progress: bool = False,
        log_interval: int = 50,
        rule: str = 'paper',
        drop_last: bool = False,
) -> Calibration:
    """Dataset thresholds (paper Eq. 9/11): from ``cache`` when its identity matches, else one teacher pass.

    Args:
        teacher_fn: ``teacher_fn(images) -> logits`` (e.g. ``task.teacher_logits``, which re-normalises).
        loader: the training images, each exactly once (no padding, no dropped batch), without mixup.
        rate: threshold fraction r in (0, 0.5].
        cache: JSON path; read when present (identity must match, values must be sane), written atomically.
        identity: what the thresholds depend on (teacher, weights hash, data, sample count...); a cache with
            another identity is refused with one line naming the key that differs.
        energy_temperature: T_E of the energy score.
        num_bins: bins of the gradation policy (``num_bins - 1`` edges).
        he_da_rate: HE-DA's own selection rate when it differs from ``rate``; computed in the same pass.
        save: write the cache(s) (rank 0 only under DDP).
        rule: threshold index rule, ``'paper'`` or ``'authors'`` (``energy.threshold_indices``).
        drop_last: leave out the last partial batch, as the authors' pass does.

    Raises:
        ValueError: the cache's identity differs, it is corrupt, or its values are not usable thresholds.
    """
    identity = dict(identity or {}, rate=rate, energy_temperature=energy_temperature, num_bins=int(num_bins))
    separate_he = he_da_rate is not None and he_da_rate != rate
    he_identity = dict(identity, rate=he_da_rate)
    he_cache = he_da_cache_path(cache) if cache else None

    if cache and os.path.isdir(cache):
        raise ValueError(f'calibration cache {cache} is a folder; expected a JSON file path')
    if cache and os.path.isfile(cache):
        thresholds = _load(cache, identity)
        if not separate_he:
            return Calibration(thresholds, None, from_cache=True)
        if os.path.isfile(he_cache):
            return Calibration(thresholds, _load(he_cache, he_identity), from_cache=True)
        # the HE-DA cache is missing: recompute both in one pass

    # the gathered energies of the pass (the kept batches) also give HE-DA's thresholds at its own rate
    thresholds, all_e = calibrate_thresholds(
        teacher_fn, loader, rate, energy_temperature=energy_temperature, num_bins=num_bins, device=device,
        identity=identity, amp_dtype=amp_dtype, progress=progress, log_interval=log_interval, rule=rule,
        drop_last=drop_last, return_energies=True)
    check_threshold_values(thresholds, 'the teacher pass')
    he_thresholds = None
    if separate_he:
        he_thresholds = EnergyThresholds.from_energies(
            all_e, he_da_rate, energy_temperature=energy_temperature, num_bins=num_bins,
            identity=dict(he_identity, N=int(all_e.numel())), rule=rule)
    if save and cache:
        thresholds.save_json(cache)
        if he_thresholds is not None:
            he_thresholds.save_json(he_cache)
        _logger.info(f'Saved energy thresholds to {cache}')
    return Calibration(thresholds, he_thresholds, from_cache=False)
