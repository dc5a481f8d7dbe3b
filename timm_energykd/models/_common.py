"""Shared pieces of the CIFAR model families: default configs, weight init, channel shuffle."""
import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import checkpoint_seq

__all__ = [
    'CIFAR100_MEAN', 'CIFAR100_STD', 'cifar_cfg', 'imagenet_cfg', 'init_weights', 'channel_shuffle',
    'ClassifierMixin', 'ThreeStageMixin', 'run_stage', 'rename_keys',
]

# CIFAR-100 training-set statistics, as used by the KD literature (CRD / mdistiller) for all CIFAR models.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def cifar_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Default pretrained config for a CIFAR model: 32x32 input, CIFAR-100 statistics, 100 classes.

    There are no released weights (``url`` empty), so ``pretrained=True`` raises timm's usual
    "No pretrained weights exist" error unless a ``file`` / ``hf_hub_id`` is given in an overlay.
    """
    return {
        'url': url,
        'num_classes': 100,
        'input_size': (3, 32, 32),
        'pool_size': (8, 8),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN,
        'std': CIFAR100_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        'license': 'apache-2.0',
        **kwargs,
    }


def imagenet_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    """Default pretrained config for an ImageNet model (224x224, ImageNet statistics, 1000 classes)."""
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        'license': 'apache-2.0',
        **kwargs,
    }


def init_weights(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BN, small-normal classifier: the usual CIFAR KD init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view channels as (groups, C // groups), transpose, flatten back."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ClassifierMixin:
    """timm classifier-head API shared by every family here: pool -> dropout -> ``fc``.

    A family calls ``_init_head`` at the end of ``__init__`` (after its feature modules, so timm's
    feature wrappers see the modules in forward order) and implements ``forward_features``.
    """
    num_classes: int
    num_features: int
    drop_rate: float

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def run_stage(stage: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Run an nn.Sequential stage, with activation checkpointing per block when enabled and training."""
    if grad_checkpointing and x.requires_grad and not torch.jit.is_scripting():
        return checkpoint_seq(stage, x)
    return stage(x)


class ThreeStageMixin:
    """Features of the families built as stem (``conv1`` / ``bn1`` / ``act1``) then stages ``layer1..3``."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = run_stage(self.layer1, x, self.grad_checkpointing)
        x = run_stage(self.layer2, x, self.grad_checkpointing)
        x = run_stage(self.layer3, x, self.grad_checkpointing)
        return x


def rename_keys(state_dict: Dict[str, Any], rules) -> Dict[str, Any]:
    """Apply ``(pattern, replacement)`` regex rules in order to every key; values are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
