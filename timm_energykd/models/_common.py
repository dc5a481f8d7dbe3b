"""Shared pieces of the model families: default configs, weight init, channel shuffle, key renaming."""
import re
from typing import Any, Dict

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    'CIFAR100_MEAN', 'CIFAR100_STD', 'cifar_cfg', 'imagenet_cfg', 'init_weights', 'channel_shuffle', 'rename_keys',
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


def rename_keys(state_dict: Dict[str, Any], rules) -> Dict[str, Any]:
    """Apply ``(pattern, replacement)`` regex rules in order to every key; values are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
