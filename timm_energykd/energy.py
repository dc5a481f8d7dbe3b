"""Energy score of a teacher's logits, energy thresholds, and their estimation.

The energy of a sample (Kim et al., Eq. 4) is

    E(x) = -T_E * logsumexp(f(x) / T_E)        T_E = 4 by default

computed in float32 from the logits: ``torch.logsumexp`` is not on autocast's float32 list, so the cast is
explicit. Low energy means a confident teacher.

Threshold convention (paper Eq. 9/11), shared by every estimator here: with the N energies sorted
ascending (0-based), ``low = E[floor(N*r)]`` and ``high = E[min(floor(N*(1-r)), N-1)]``; a sample is
low-energy when ``E <= low`` and high-energy when ``E > high``; ``r`` is in (0, 0.5].

``rule='authors'`` (dataset thresholds only) reproduces the authors' public code instead: ``low =
E[int(N*r)]``, ``high = E[N - 1 - int(N*r)]``, low-energy when ``E < low`` (strict), high-energy when
``E > high``; their calibration pass also skips the last partial batch (``drop_last=True`` here).

Three ways to get thresholds:

* ``calibrate_thresholds``: one no-grad teacher pass over a loader (the paper's and the authors' way),
  gathered across ranks, cached as JSON by ``EnergyThresholds.save_json`` / ``load_json``.
* ``thresholds.BatchQuantileThresholds``: the same quantiles on each batch's energies (no calibration pass).
* ``thresholds.RunningThresholds``: an EMA of the per-batch quantiles, kept in buffers so it is checkpointed.
"""
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    'energy_score', 'threshold_indices', 'quantile_index', 'EnergyThresholds', 'calibrate_thresholds', 'RULES',
    'gather_variable_length', 'check_rate',
]

_logger = logging.getLogger(__name__)

_HIST_BINS = 50

RULES = ('paper', 'authors')


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule='{rule}'; expected one of: {', '.join(RULES)}")


def energy_score(logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Energy ``-T_E * logsumexp(logits / T_E)`` over the last dim, in float32. Returns [B]."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


def check_rate(rate: float, name: str = 'rate') -> None:
    if not (0.0 < float(rate) <= 0.5):
        raise ValueError(f'{name}={rate} is out of range; expected 0 < {name} <= 0.5')


def quantile_index(num_samples: int, fraction: float) -> int:
    """0-based index ``min(floor(N * fraction), N - 1)`` into N ascending values.

    A 1e-9 slack keeps decimal products exact (``floor(100 * 0.29)`` is 29, not 28 from ``28.999...``).
    """
    return min(int(math.floor(num_samples * fraction + 1e-9)), num_samples - 1)


def threshold_indices(num_samples: int, rate: float, rule: str = 'paper') -> Tuple[int, int]:
    """0-based (low, high) indices into N ascending energies.

    ``rule='paper'``: ``(floor(N*r), min(floor(N*(1-r)), N-1))``; N=10, r=0.2 -> (2, 8).
    ``rule='authors'``: ``(int(N*r), N - 1 - int(N*r))`` with Python's float product, as their code; -> (2, 7).
    """
    check_rate(rate)
    _check_rule(rule)
    if num_samples < 1:
        raise ValueError(f'num_samples={num_samples}; thresholds need at least one energy')
    if rule == 'authors':
        k = min(int(num_samples * rate), num_samples - 1)
        return k, num_samples - 1 - k
    return quantile_index(num_samples, rate), quantile_index(num_samples, 1.0 - rate)


def _bin_edge_indices(num_samples: int, num_bins: int) -> List[int]:
    """Indices ``min(floor(N * k / num_bins), N - 1)`` of the ``num_bins - 1`` interior quantile edges.

    Integer arithmetic (exact), mirrored on-device in ``thresholds.py``.
    """
    return [min(num_samples * k // num_bins, num_samples - 1) for k in range(1, num_bins)]


@dataclass
class EnergyThresholds:
    """Energy thresholds computed over a calibration set, with diagnostics and cache identity.

    Attributes:
        low: Low-energy threshold; samples with ``E <= low`` (``E < low`` under ``rule='authors'``) are
            low-energy (confident).
        high: High-energy threshold; samples with ``E > high`` are high-energy (uncertain).
        rate: The fraction ``r`` used for both thresholds.
        energy_temperature: ``T_E`` the energies were computed with.
        num_samples: Number of energies the thresholds were computed from.
        bin_edges: ``num_bins - 1`` ascending interior quantile edges, for graded temperatures.
        histogram: ``{'counts': [...], 'edges': [...]}`` over the energies (50 bins), for plots.
        bin_counts: ``{'low': n, 'mid': n, 'high': n}`` over the calibration set.
        identity: What the thresholds were computed from (teacher, checkpoint sha256, dataset, split, N,
            transform repr, r, T_E...); checked by ``load_json(expect_identity=...)``.
        rule: ``'paper'`` or ``'authors'``: the index rule used, and the low-group comparison it implies.
    """
    low: float
    high: float
    rate: float
    energy_temperature: float = 4.0
    num_samples: int = 0
    bin_edges: List[float] = field(default_factory=list)
    histogram: Dict[str, Any] = field(default_factory=dict)
    bin_counts: Dict[str, int] = field(default_factory=dict)
    identity: Dict[str, Any] = field(default_factory=dict)
    rule: str = 'paper'

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1

    @classmethod
    def from_energies(
            cls,
            energies: torch.Tensor,
            rate: float,
            energy_temperature: float = 4.0,
            num_bins: int = 10,
            identity: Optional[Dict[str, Any]] = None,
            rule: str = 'paper',
    ) -> 'EnergyThresholds':
        """Thresholds from a 1-D tensor of energies (any device), with the index rule ``rule``."""
        check_rate(rate)
        _check_rule(rule)
        if num_bins < 2:
            raise ValueError(f'num_bins={num_bins}; expected at least 2')
        e = energies.detach().reshape(-1).double().cpu()
        n = e.numel()
        if n < 1:
            raise ValueError('no energies to compute thresholds from (empty calibration set?)')
        finite = torch.isfinite(e)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f'{bad} of {n} teacher energies are not finite (NaN/Inf teacher logits); check the teacher '
                f'checkpoint and its input normalisation')
        e_sorted, _ = torch.sort(e)
        i_low, i_high = threshold_indices(n, rate, rule)
        low, high = float(e_sorted[i_low]), float(e_sorted[i_high])
        edges = [float(e_sorted[i]) for i in _bin_edge_indices(n, num_bins)]
        lo, hi = float(e_sorted[0]), float(e_sorted[-1])
        if hi <= lo:
            hi = lo + 1e-6  # all energies equal; histc needs a non-empty range
        counts = torch.histc(e, bins=_HIST_BINS, min=lo, max=hi)
        hist_edges = torch.linspace(lo, hi, _HIST_BINS + 1, dtype=torch.float64)
        n_low = int((e < low).sum()) if rule == 'authors' else int((e <= low).sum())
        n_high = int((e > high).sum())
        identity = dict(identity or {})
        return cls(
            low=low,
            high=high,
            rate=float(rate),
            energy_temperature=float(energy_temperature),
            num_samples=n,
            bin_edges=edges,
            histogram={'counts': [int(c) for c in counts.tolist()], 'edges': hist_edges.tolist()},
            bin_counts={'low': n_low, 'mid': n - n_low - n_high, 'high': n_high},
            identity=identity,
            rule=rule,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'EnergyThresholds':
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ('low', 'high', 'rate') if k not in d]
        if missing:
            raise ValueError(f"energy thresholds dict is missing {', '.join(missing)}")
        out = cls(**{k: v for k, v in d.items() if k in names})
        out.low, out.high, out.rate = float(out.low), float(out.high), float(out.rate)
        out.bin_edges = [float(v) for v in out.bin_edges]
        _check_rule(out.rule)
        return out

    def save_json(self, path) -> None:
        """Write as JSON atomically (temp file in the same folder, then ``os.replace``)."""
        from .files import write_atomic  # one atomic-write implementation for the whole package
        write_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load_json(cls, path, expect_identity: Optional[Dict[str, Any]] = None) -> 'EnergyThresholds':
        """Read a JSON cache; refuse it when any ``expect_identity`` entry differs from what it was built from.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a valid thresholds cache, or an identity key differs.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'calibration cache {path} does not exist')
        try:
            with open(path) as f:
                out = cls.from_dict(json.load(f))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f'calibration cache {path} is corrupt or not an energy thresholds file ({e})') from None
        for key, want in (expect_identity or {}).items():
            have = out.identity.get(key, '<missing>')
            if _normalise(have) != _normalise(want):
                raise ValueError(
                    f'calibration cache {path} was computed for {key}={have}, this run has {want}; '
                    f'delete it or point to another cache to recalibrate')
        return out


def _normalise(v: Any) -> Any:
    # JSON turns tuples into lists and may print ints as floats; compare through a JSON round-trip
    return json.loads(json.dumps(v, default=str))


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_variable_length(t: torch.Tensor) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths from every rank; returns their concatenation (rank order).

    Sizes are gathered first, every rank pads to the largest, and the padding is trimmed after. Syncs the
    host (it must know the sizes); meant for calibration, not for the training step.
    """
    if not _dist_ready():
        return t
    world = dist.get_world_size()
    t = t.reshape(-1).contiguous()
    size = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    max_size = max(sizes)
    padded = t.new_zeros(max_size)
    padded[:t.numel()] = t
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)])


def calibrate_thresholds(
        teacher_fn: Callable[[torch.Tensor], torch.Tensor],
        loader: Iterable,
        rate: float,
        energy_temperature: float = 4.0,
        num_bins: int = 10,
        device: Optional[torch.device] = None,
        identity: Optional[Dict[str, Any]] = None,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
        log_interval: int = 50,
        rule: str = 'paper',
        drop_last: bool = False,
        return_energies: bool = False,
):
    """One no-grad teacher pass over ``loader``; thresholds from all the energies.

    Under ``torch.distributed`` every rank's energies are all-gathered (lengths may differ) and the
    thresholds are computed on the concatenation, so every rank gets identical thresholds, equal to the
    single-process value over the same samples. A ``DistributedSampler`` that pads the dataset to a
    multiple of the world size repeats a few samples; that is the caller's choice of loader.

    Args:
        teacher_fn: ``teacher_fn(input) -> logits`` (e.g. ``task.teacher_logits``, which re-normalises).
        loader: Yields ``(input, target)`` batches; targets are ignored.
        rate: Threshold fraction r in (0, 0.5].
        energy_temperature: T_E for the energy score.
        num_bins: Number of quantile bins for graded temperatures (``num_bins - 1`` edges).
        device: Where inputs are moved; default: leave them where the loader puts them.
        identity: Stored in the result (``N`` is filled in with the gathered count).
        amp_dtype: Run the teacher under ``torch.autocast`` with this dtype (energies stay float32).
        progress: Log progress (count, img/s, ETA) on rank 0.
        log_interval: Batches between progress lines.
        rule: Index rule, ``'paper'`` (default) or ``'authors'`` (see the module docstring).
        drop_last: Leave out the last batch when it is smaller than the first (the authors' pass skips
            the partial batch of a loader without ``drop_last``); per rank under DDP.
        return_energies: Also return the gathered energies that were used (e.g. for HE-DA thresholds at
            another rate from the same pass: ``EnergyThresholds.from_energies(energies, rate_he, rule=...)``).

    Returns:
        ``EnergyThresholds``, or ``(EnergyThresholds, energies)`` with ``return_energies=True``.
    """
    check_rate(rate)
    _check_rule(rule)
    if num_bins < 2:
        raise ValueError(f'num_bins={num_bins}; expected at least 2')
    rank0 = not _dist_ready() or dist.get_rank() == 0
    try:
        num_batches = len(loader)
    except TypeError:
        num_batches = None

    energies = []
    seen = 0
    start = time.time()
    with torch.no_grad():
        for batch_idx, batch in enumerate(loader):
            input = batch[0] if isinstance(batch, (tuple, list)) else batch
            if device is not None:
                input = input.to(device, non_blocking=True)
            if amp_dtype is not None:
                with torch.autocast(device_type=input.device.type, dtype=amp_dtype):
                    logits = teacher_fn(input)
            else:
                logits = teacher_fn(input)
            energies.append(energy_score(logits, energy_temperature))
            seen += input.shape[0]
            last = num_batches is not None and batch_idx + 1 == num_batches
            if progress and rank0 and log_interval > 0 and ((batch_idx + 1) % log_interval == 0 or last):
                elapsed = max(time.time() - start, 1e-9)
                rate_s = seen / elapsed
                msg = f'Calibrating energy thresholds: batch {batch_idx + 1}'
                if num_batches:
                    eta = elapsed / (batch_idx + 1) * (num_batches - batch_idx - 1)
                    msg += f'/{num_batches}, ETA {eta:.0f}s'
                _logger.info(f'{msg}, {seen} images on this rank, {rate_s:.1f} img/s')

    if drop_last and len(energies) > 1 and energies[-1].numel() < energies[0].numel():
        energies = energies[:-1]
    if energies:
        local = torch.cat(energies)
    else:
        dev = device if device is not None else torch.device('cpu')
        local = torch.zeros(0, dtype=torch.float32, device=dev)
    all_energies = gather_variable_length(local)
    identity = dict(identity or {})
    identity['N'] = int(all_energies.numel())
    out = EnergyThresholds.from_energies(
        all_energies, rate, energy_temperature=energy_temperature, num_bins=num_bins, identity=identity, rule=rule)
    if progress and rank0:
        _logger.info(
            f'Energy thresholds over {out.num_samples} samples: low={out.low:.4f} high={out.high:.4f} '
            f'(r={rate}, T_E={energy_temperature}, rule={rule}), counts {out.bin_counts}')
    return (out, all_energies) if return_energies else out
