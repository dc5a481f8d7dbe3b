"""Temperature policies: per-sample distillation temperatures from the teacher's energy.

A policy is an ``nn.Module`` with ``forward(energy[B], low, high, bin_edges=None) -> [B] float32``;
``low`` / ``high`` / ``bin_edges`` are the thresholds (python floats or tensors, see ``energy.py``).

Direction convention (``direction=``):

* ``'paper'`` (default, the paper's text): low-energy (confident) samples get the HIGHER temperature
  (``base + delta_low`` = 6), high-energy samples the LOWER one (``base + delta_high`` = 2).
* ``'reverse'``: the other way round (what the authors' public code does: below low -> 2, above high -> 6).
"""
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

__all__ = ['TwoBinTemperature', 'GradedTemperature', 'create_temperature_policy', 'register_temperature_policy',
           'list_temperature_policies']

_DIRECTIONS = ('paper', 'reverse')
_POLICIES: Dict[str, Callable[..., nn.Module]] = {}

Threshold = Union[float, torch.Tensor]


def register_temperature_policy(name: str):
    def _register(cls):
        _POLICIES[name] = cls
        return cls
    return _register


def list_temperature_policies():
    return sorted(_POLICIES)


def create_temperature_policy(name: str, **kwargs) -> nn.Module:
    """Build a temperature policy by name: ``'two_bin'`` or ``'gradation'``."""
    if name not in _POLICIES:
        known = ', '.join(list_temperature_policies())
        raise ValueError(f"unknown temperature policy '{name}'; expected one of: {known}")
    return _POLICIES[name](**kwargs)


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction='{direction}' is not supported; expected one of: {', '.join(_DIRECTIONS)}")


def _as_tensor(v: Threshold, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=like.device)


@register_temperature_policy('two_bin')
class TwoBinTemperature(nn.Module):
    """Energy KD's temperatures: one value for low-energy samples, one for high-energy, ``base`` between.

    With ``direction='paper'``: ``E <= low`` -> ``base + delta_low``, ``E > high`` -> ``base + delta_high``,
    otherwise ``base`` (4 / 6 / 2 with the defaults). ``direction='reverse'`` swaps the two group values.
    ``rule='authors'`` makes the low group strict, ``E < low``, as the authors' code (with their thresholds,
    ``EnergyThresholds.from_energies(..., rule='authors')``); their temperatures are ``direction='reverse'``.

    Args:
        base: Temperature of the middle group (the KD temperature T).
        delta_low: T(+), added to ``base`` for the low-energy group (paper direction).
        delta_high: T(-), added to ``base`` for the high-energy group (paper direction).
        direction: ``'paper'`` or ``'reverse'``.
        low_temperature: Explicit temperature for the low-energy group, overriding ``base + delta_low``.
        high_temperature: Explicit temperature for the high-energy group, overriding ``base + delta_high``.
        rule: ``'paper'`` (``E <= low``) or ``'authors'`` (``E < low``).
    """

    def __init__(
            self,
            base: float = 4.0,
            delta_low: float = 2.0,
            delta_high: float = -2.0,
            direction: str = 'paper',
            low_temperature: Optional[float] = None,
            high_temperature: Optional[float] = None,
            rule: str = 'paper',
    ):
        super().__init__()
        _check_direction(direction)
        if rule not in ('paper', 'authors'):
            raise ValueError(f"rule='{rule}'; expected 'paper' (E <= low) or 'authors' (E < low)")
        self.rule = rule
        if base <= 0:
            raise ValueError(f'base={base}; the temperature must be > 0')
        t_low = float(low_temperature) if low_temperature is not None else base + delta_low
        t_high = float(high_temperature) if high_temperature is not None else base + delta_high
        if t_low <= 0:
            arg = f'low_temperature={low_temperature}' if low_temperature is not None else \
                f'delta_low={delta_low} (base + delta_low = {t_low})'
            raise ValueError(f'{arg} gives a low-energy temperature <= 0; every temperature must be > 0')
        if t_high <= 0:
            arg = f'high_temperature={high_temperature}' if high_temperature is not None else \
                f'delta_high={delta_high} (base + delta_high = {t_high})'
            raise ValueError(f'{arg} gives a high-energy temperature <= 0; every temperature must be > 0')
        if direction == 'reverse':
            t_low, t_high = t_high, t_low
        self.base = float(base)
        self.direction = direction
        # temperatures actually applied to the low- and high-energy groups (after the direction swap)
        self.low_group_temperature = t_low
        self.high_group_temperature = t_high

    def forward(
            self,
            energy: torch.Tensor,
            low: Threshold,
            high: Threshold,
            bin_edges: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        energy = energy.detach().float()
        t = torch.full_like(energy, self.base)
        low = _as_tensor(low, energy)
        in_low = energy < low if self.rule == 'authors' else energy <= low
        t = torch.where(in_low, torch.full_like(t, self.low_group_temperature), t)
        t = torch.where(energy > _as_tensor(high, energy), torch.full_like(t, self.high_group_temperature), t)
        return t

    def extra_repr(self) -> str:
        return (f'base={self.base}, low_group={self.low_group_temperature}, '
                f'high_group={self.high_group_temperature}, direction={self.direction}, rule={self.rule}')


@register_temperature_policy('gradation')
class GradedTemperature(nn.Module):
    """Energy KD with gradation: ``num_bins`` energy bins, temperatures evenly spaced from t_max to t_min.

    A sample's bin is ``torch.bucketize(E, bin_edges)`` (bin 0: ``E <= bin_edges[0]``, the same ``<=``
    convention as the low threshold). With ``direction='paper'`` the lowest-energy bin gets ``t_max`` and the
    highest-energy bin ``t_min``; ``'reverse'`` flips that.

    Args:
        t_min: Smallest temperature (> 0).
        t_max: Largest temperature (>= t_min).
        num_bins: Number of energy bins (>= 2); ``bin_edges`` must hold ``num_bins - 1`` ascending values.
        direction: ``'paper'`` or ``'reverse'``.
    """

    def __init__(self, t_min: float = 2.0, t_max: float = 6.0, num_bins: int = 10, direction: str = 'paper'):
        super().__init__()
        _check_direction(direction)
        if num_bins < 2:
            raise ValueError(f'num_bins={num_bins}; gradation needs at least 2 bins')
        if t_min <= 0:
            raise ValueError(f't_min={t_min}; every temperature must be > 0')
        if t_min > t_max:
            raise ValueError(f't_min={t_min} is larger than t_max={t_max}')
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.num_bins = int(num_bins)
        self.direction = direction
        temps = torch.linspace(self.t_max, self.t_min, self.num_bins, dtype=torch.float64).float()
        if direction == 'reverse':
            temps = temps.flip(0)
        self.register_buffer('bin_temperatures', temps, persistent=False)

    def forward(
            self,
            energy: torch.Tensor,
            low: Threshold,
            high: Threshold,
            bin_edges: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if bin_edges is None:
            raise ValueError('GradedTemperature needs bin_edges (num_bins - 1 energy quantiles)')
        energy = energy.detach().float()
        edges = _as_tensor(bin_edges, energy).reshape(-1)
        if edges.numel() != self.num_bins - 1:
            raise ValueError(
                f'bin_edges has {edges.numel()} values; num_bins={self.num_bins} needs {self.num_bins - 1}')
        idx = torch.bucketize(energy, edges.contiguous())
        return self.bin_temperatures.to(energy.device)[idx]

    def extra_repr(self) -> str:
        return f't_min={self.t_min}, t_max={self.t_max}, num_bins={self.num_bins}, direction={self.direction}'
