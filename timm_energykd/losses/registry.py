"""The distillation-loss contract and its registry.

Every loss is a ``DistillLoss`` (an ``nn.Module``) with

    per_sample(student_logits, teacher_logits, target, temperature, valid=None) -> [B]
    forward(student_logits, teacher_logits, target, temperature) -> scalar (mean of ``per_sample``)

    student_logits  [B, C]  (any float dtype; computed in float32 inside)
    teacher_logits  [B, C]  (no grad needed)
    target          [B] class indices, or [B, C] soft targets (mixup / label smoothing)
    temperature     python float, 0-d tensor or [B] tensor of per-sample temperatures (> 0)
    valid           optional [B] bool: rows to keep. Row-wise losses ignore it (the caller masks their rows);
                    losses with batch terms (R2KD's per-class cosine, CSKD) leave the other rows out of
                    those terms, so ``sum(per_sample * valid) / valid.sum()`` is the loss of the valid rows.

``per_sample`` is required (registration refuses a class without it), so the task has one path for
teacher rows with non-finite logits: they are masked out of the mean.

**One registry entry per method.** Where the energy temperatures make sense, a method is registered under
its own name and, with ``energy_name``, under the name of its energy variant; both build the same class,
only ``temperature_source`` differs (``'fixed'``: the task passes its base temperature; ``'energy'``: the
task passes the energy policy's per-sample temperatures). ``create_distill_loss('energy_kd')`` is
``create_distill_loss('kd', temperature_source='energy')``.

**Options declared by the loss.** A class attribute ``trainer_options`` maps trainer flag names (argparse
dests, e.g. ``dkd_alpha``) to constructor keywords (``alpha``); ``loss_kwargs_from_args(name, args)``
reads them, so a trainer needs no list of loss names.
"""
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Type, Union

import torch
import torch.nn as nn

__all__ = [
    'DistillLoss', 'LossEntry', 'TEMPERATURE_SOURCES', 'register_distill_loss', 'create_distill_loss',
    'list_distill_losses', 'is_distill_loss', 'get_loss_entry', 'uses_energy_temperature', 'loss_options',
    'loss_kwargs_from_args', 'loss_entries', 'hard_target', 'as_sample_temperature', 'valid_weights', 'masked_mean',
]

TEMPERATURE_SOURCES = ('fixed', 'energy')

Temperature = Union[float, torch.Tensor]


class DistillLoss(nn.Module):
    """Base class of every registered logit-distillation loss.

    Subclasses implement ``per_sample``; ``forward`` is its batch mean. ``set_progress(epoch)`` is called by
    the task for schedules (DKD's warm-up); the default ignores it. ``prepare_logits`` is a hook applied to
    both logit tensors before the loss (identity here; logit standardisation overrides it).

    Class attributes:
        supports_energy_temperature: False for methods that choose their own per-sample temperatures
            (CSKD): ``temperature_source='energy'`` is then refused.
        trainer_options: trainer flag (argparse dest) -> constructor keyword, e.g. ``{'dkd_alpha': 'alpha'}``.

    Args:
        temperature_source: ``'fixed'`` (the task's base temperature) or ``'energy'`` (the energy policy's
            per-sample temperatures); sets ``uses_energy_temperature``.
    """
    supports_energy_temperature: ClassVar[bool] = True
    trainer_options: ClassVar[Dict[str, str]] = {}
    loss_name: str = ''

    def __init__(self, temperature_source: str = 'fixed'):
        super().__init__()
        if temperature_source not in TEMPERATURE_SOURCES:
            raise ValueError(f"temperature_source='{temperature_source}'; expected one of: "
                             f"{', '.join(TEMPERATURE_SOURCES)}")
        if temperature_source == 'energy' and not self.supports_energy_temperature:
            raise ValueError(f"{type(self).__name__} chooses its own per-sample temperatures; "
                             f"temperature_source='energy' is not supported")
        self.temperature_source = temperature_source
        self.uses_energy_temperature = temperature_source == 'energy'

    def set_progress(self, epoch: float) -> None:
        pass

    def prepare_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        return student_logits, teacher_logits

    def per_sample(
            self,
            student_logits: torch.Tensor,
            teacher_logits: torch.Tensor,
            target: torch.Tensor,
            temperature: Temperature,
            valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits, teacher_logits, target, temperature) -> torch.Tensor:
        return self.per_sample(student_logits, teacher_logits, target, temperature).mean()


@dataclass(frozen=True)
class LossEntry:
    """One name in the registry: the class it builds and the temperature source that name selects."""
    name: str
    cls: Type[DistillLoss]
    temperature_source: str

    @property
    def uses_energy_temperature(self) -> bool:
        return self.temperature_source == 'energy'

    @property
    def trainer_options(self) -> Dict[str, str]:
        return dict(getattr(self.cls, 'trainer_options', {}) or {})


_ENTRIES: Dict[str, LossEntry] = {}


def _add(name: str, cls: Type[DistillLoss], source: str) -> None:
    old = _ENTRIES.get(name)
    if old is not None and (old.cls is not cls or old.temperature_source != source):
        raise ValueError(f"distillation loss '{name}' is already registered by {old.cls.__name__}")
    _ENTRIES[name] = LossEntry(name, cls, source)


def register_distill_loss(
        name: str,
        energy_name: Optional[str] = None,
) -> Callable[[Type[DistillLoss]], Type[DistillLoss]]:
    """Class decorator: register a loss under ``name`` (fixed temperature) and, optionally, ``energy_name``
    (the energy policy's per-sample temperatures). The class must define ``per_sample``."""
    def _register(cls: Type[DistillLoss]) -> Type[DistillLoss]:
        if not callable(getattr(cls, 'per_sample', None)) or getattr(cls, 'per_sample') is DistillLoss.per_sample:
            raise TypeError(f"distillation loss '{name}' ({cls.__name__}) must define per_sample(student_logits, "
                            f"teacher_logits, target, temperature, valid=None) -> [B]")
        if energy_name is not None and not getattr(cls, 'supports_energy_temperature', True):
            raise ValueError(f"'{name}' does not support energy temperatures; no '{energy_name}' entry")
        _add(name, cls, 'fixed')
        if energy_name is not None:
            _add(energy_name, cls, 'energy')
        cls.loss_name = name
        return cls
    return _register


def loss_entries() -> Mapping[str, LossEntry]:
    """Read-only view of the registry: name -> ``LossEntry``."""
    return MappingProxyType(_ENTRIES)


def list_distill_losses() -> List[str]:
    """Every name a user can type (methods and their energy variants), sorted."""
    return sorted(_ENTRIES)


def is_distill_loss(name: str) -> bool:
    return name in _ENTRIES


def get_loss_entry(name: str) -> LossEntry:
    if name not in _ENTRIES:
        raise ValueError(f"unknown distillation loss '{name}'; expected one of: {', '.join(list_distill_losses())}")
    return _ENTRIES[name]


def uses_energy_temperature(name: str) -> bool:
    """Whether the registered name ``name`` takes the energy policy's per-sample temperatures."""
    return get_loss_entry(name).uses_energy_temperature


def loss_options(name: str) -> Dict[str, str]:
    """Trainer flag (argparse dest) -> constructor keyword, as declared by the loss ``name``."""
    return get_loss_entry(name).trainer_options


def loss_kwargs_from_args(name: str, args: Any) -> Dict[str, Any]:
    """Constructor keywords for ``name`` read from an argparse namespace (or a mapping) by ``loss_options``.

    Flags the namespace lacks are left to the loss's defaults.
    """
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    missing = object()
    out = {}
    for dest, kw in loss_options(name).items():
        v = get(dest, missing)
        if v is not missing and v is not None:
            out[kw] = v
    return out


def create_distill_loss(name: str, **kwargs) -> DistillLoss:
    """Build a registered loss by name; unknown names list the known ones.

    An energy name (``energy_kd``) fixes ``temperature_source='energy'``; passing another source with it
    raises ``ValueError``.
    """
    entry = get_loss_entry(name)
    source = kwargs.pop('temperature_source', entry.temperature_source)
    if entry.temperature_source == 'energy' and source != 'energy':
        raise ValueError(f"'{name}' is the energy-temperature variant; temperature_source='{source}' contradicts it "
                         f"(use '{entry.cls.loss_name}')")
    loss = entry.cls(temperature_source=source, **kwargs)
    loss.loss_name = name
    return loss


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices from hard [B] or soft [B, C] targets.

    Losses that need the ground-truth class (DKD, ReKD, ...) use the arg-max of a soft target: with timm's
    mixup that is the dominant image's (smoothed) label, the usual rule in KD code.
    """
    return target.argmax(dim=-1) if target.ndim == 2 else target


def as_sample_temperature(temperature: Temperature, logits: torch.Tensor) -> torch.Tensor:
    """Temperature as a float32 [B, 1] column broadcastable over classes."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.ndim == 0:
        t = t.expand(logits.shape[0])
    return t.reshape(-1, 1)


def valid_weights(valid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """[B] float32 row weights (1 keep, 0 drop) from an optional bool mask."""
    if valid is None:
        return torch.ones(like.shape[0], dtype=torch.float32, device=like.device)
    return valid.to(device=like.device, dtype=torch.float32).reshape(-1)


def masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B] over the rows with weight 1 (0-d; 0 when none)."""
    return (x * w).sum() / w.sum().clamp(min=1.0)

