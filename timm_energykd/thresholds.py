"""Online energy thresholds: per batch (``BatchQuantileThresholds``) and a running EMA (``RunningThresholds``).

Both use the dataset convention of ``energy.threshold_indices`` (the paper's rule) on the batch's energies,
with index positions as Python ints, so there is no host sync in the training step.
"""
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .energy import check_rate as _check_rate, threshold_indices

__all__ = ['BatchQuantileThresholds', 'RunningThresholds']


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _bin_edge_index_tensor(num_samples: int, num_bins: int, device) -> torch.Tensor:
    # built on the device (no host->device copy, which would stall the stream in a training step)
    k = torch.arange(1, num_bins, device=device)
    return (k * num_samples // num_bins).clamp_(max=num_samples - 1)


def _batch_quantiles(
        energy: torch.Tensor,
        rate: float,
        num_bins: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, high, bin_edges) of one batch of energies; index positions are python ints -> no host sync."""
    e_sorted, _ = torch.sort(energy.detach().float().reshape(-1))
    n = e_sorted.numel()
    i_low, i_high = threshold_indices(n, rate)
    edge_idx = _bin_edge_index_tensor(n, num_bins, e_sorted.device)
    return e_sorted[i_low], e_sorted[i_high], e_sorted.index_select(0, edge_idx)


def _gather_equal(energy: torch.Tensor) -> torch.Tensor:
    """All-gather same-length energies from every rank (training batches; ``drop_last`` keeps sizes equal)."""
    if not _dist_ready():
        return energy
    energy = energy.detach().float().reshape(-1).contiguous()
    chunks = [torch.empty_like(energy) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, energy)
    return torch.cat(chunks)


class BatchQuantileThresholds(nn.Module):
    """Thresholds from the quantiles of the current batch's energies (no calibration pass).

    ``forward(energy[B]) -> (low, high, bin_edges)`` as float32 tensors on the energy's device.

    Args:
        rate: Threshold fraction r in (0, 0.5].
        num_bins: Quantile bins for graded temperatures (``num_bins - 1`` edges).
        sync_distributed: All-gather the batch energies across ranks first (all ranks then share
            thresholds; needs equal per-rank batch sizes). Default False: per-rank batch quantiles.
    """

    def __init__(self, rate: float = 0.2, num_bins: int = 10, sync_distributed: bool = False):
        super().__init__()
        _check_rate(rate)
        if num_bins < 2:
            raise ValueError(f'num_bins={num_bins}; expected at least 2')
        self.rate = float(rate)
        self.num_bins = int(num_bins)
        self.sync_distributed = sync_distributed

    def forward(self, energy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sync_distributed:
            energy = _gather_equal(energy)
        return _batch_quantiles(energy, self.rate, self.num_bins)

    def extra_repr(self) -> str:
        return f'rate={self.rate}, num_bins={self.num_bins}'


class RunningThresholds(nn.Module):
    """Exponential moving average of per-batch quantile thresholds.

    ``value = momentum * value + (1 - momentum) * batch_value``; the first batch initialises it. State is
    in buffers (``low``, ``high``, ``bin_edges``, ``initialized``), so it is in ``state_dict`` and a resume
    continues exactly. Updates only in training mode; in eval mode the stored values are returned (the
    batch values until the first update). The update is branch-free (``torch.where``): no host sync.

    Args:
        rate: Threshold fraction r in (0, 0.5].
        momentum: Weight of the running value, in [0, 1).
        num_bins: Quantile bins for graded temperatures (``num_bins - 1`` edges).
        sync_distributed: All-gather the batch energies across ranks when ``torch.distributed`` is
            initialised, so every rank keeps the same running thresholds (needs equal per-rank batch sizes).
    """

    def __init__(self, rate: float = 0.2, momentum: float = 0.9, num_bins: int = 10, sync_distributed: bool = True):
        super().__init__()
        _check_rate(rate)
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f'momentum={momentum} is out of range; expected 0 <= momentum < 1')
        if num_bins < 2:
            raise ValueError(f'num_bins={num_bins}; expected at least 2')
        self.rate = float(rate)
        self.momentum = float(momentum)
        self.num_bins = int(num_bins)
        self.sync_distributed = sync_distributed
        self.register_buffer('low', torch.zeros(()))
        self.register_buffer('high', torch.zeros(()))
        self.register_buffer('bin_edges', torch.zeros(num_bins - 1))
        self.register_buffer('initialized', torch.zeros((), dtype=torch.bool))

    def forward(self, energy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sync_distributed:
            energy = _gather_equal(energy)
        b_low, b_high, b_edges = _batch_quantiles(energy, self.rate, self.num_bins)
        m = self.momentum
        init = self.initialized
        low = torch.where(init, m * self.low + (1 - m) * b_low, b_low)
        high = torch.where(init, m * self.high + (1 - m) * b_high, b_high)
        edges = torch.where(init, m * self.bin_edges + (1 - m) * b_edges, b_edges)
        if self.training:
            with torch.no_grad():
                self.low.copy_(low)
                self.high.copy_(high)
                self.bin_edges.copy_(edges)
                self.initialized.fill_(True)
            return low, high, edges
        return (
            torch.where(init, self.low, b_low),
            torch.where(init, self.high, b_high),
            torch.where(init, self.bin_edges, b_edges),
        )

    def extra_repr(self) -> str:
        return f'rate={self.rate}, momentum={self.momentum}, num_bins={self.num_bins}'
