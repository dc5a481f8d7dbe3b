"""Distillation losses with per-sample temperatures, and their registry.

Every distillation loss here is an ``nn.Module`` whose ``forward`` takes

    student_logits  [B, C]  (any float dtype; computed in float32 inside)
    teacher_logits  [B, C]  (no grad needed)
    target          [B] class indices, or [B, C] soft targets (mixup / label smoothing)
    temperature     python float, 0-d tensor or [B] tensor of per-sample temperatures (> 0)

and returns a scalar loss (batch mean). Per-sample losses are exposed as free functions so they can be
tested against float64 references alone.

Losses that want the per-sample temperature of the energy policy set the class attribute
``uses_energy_temperature = True``; the distillation task then passes the policy's [B] temperatures,
otherwise it passes the fixed base temperature.

New losses register by name:

    @register_distill_loss('my_kd')
    class MyKD(DistillLoss):
        ...

    loss = create_distill_loss('my_kd', temperature=4.0)
"""
from typing import Callable, Dict, List, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'DistillLoss', 'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'is_distill_loss',
    'hard_target', 'as_sample_temperature', 'kd_loss_per_sample',
]

_DISTILL_LOSSES: Dict[str, Type[nn.Module]] = {}


def register_distill_loss(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator that registers a distillation loss under ``name``."""
    def _register(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in _DISTILL_LOSSES and _DISTILL_LOSSES[name] is not cls:
            raise ValueError(f"distillation loss '{name}' is already registered by {_DISTILL_LOSSES[name].__name__}")
        _DISTILL_LOSSES[name] = cls
        cls.loss_name = name
        return cls
    return _register


def list_distill_losses() -> List[str]:
    """Names of all registered distillation losses, sorted."""
    return sorted(_DISTILL_LOSSES)


def is_distill_loss(name: str) -> bool:
    return name in _DISTILL_LOSSES


def create_distill_loss(name: str, **kwargs) -> nn.Module:
    """Build a registered distillation loss by name; unknown names list the known ones."""
    if name not in _DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss '{name}'; expected one of: {', '.join(list_distill_losses())}")
    return _DISTILL_LOSSES[name](**kwargs)


class DistillLoss(nn.Module):
    """Base class: a logit distillation loss with an optional per-sample temperature.

    Subclasses implement ``forward(student_logits, teacher_logits, target, temperature)``.
    ``set_progress(epoch)`` is called by the trainer at each epoch start (fractional epochs allowed) for
    losses with a schedule such as DKD's warm-up; the default ignores it.
    """
    uses_energy_temperature: bool = False
    loss_name: str = ''

    def set_progress(self, epoch: float) -> None:
        pass

    def forward(
            self,
            student_logits: torch.Tensor,
            teacher_logits: torch.Tensor,
            target: torch.Tensor,
            temperature: Union[float, torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices from hard [B] or soft [B, C] targets.

    Losses that need the ground-truth class (DKD, TISD, ...) use the arg-max of a soft target: with
    timm's mixup that is the dominant image's (smoothed) label, the usual rule in KD code.
    """
    return target.argmax(dim=-1) if target.ndim == 2 else target


def as_sample_temperature(temperature: Union[float, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """Temperature as a float32 [B, 1] column broadcastable over classes."""
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.ndim == 0:
        t = t.expand(logits.shape[0])
    return t.reshape(-1, 1)


def kd_loss_per_sample(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: Union[float, torch.Tensor],
) -> torch.Tensor:
    """Hinton KD per sample: KL(softmax(t/T) || softmax(s/T)) * T^2, each sample with its own T. Returns [B].

    Computed in float32 from log-softmaxes (never a log of a probability), so logits of any magnitude and
    fp16/bf16 inputs give finite values.
    """
    t = as_sample_temperature(temperature, student_logits)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl * t.squeeze(1) ** 2
