"""Parameter and MAC counts of the registered models (for docs/MODELS.md).

MACs are multiply-accumulates of convolutions and linear layers for one image at the model's default
input size, counted with ``torch.utils.flop_counter.FlopCounterMode`` (which reports 2 FLOPs per MAC);
BN, activations and pooling are not counted, as in the KD and ShuffleNet literature.

    python -m timm_energykd.models.profile            # markdown table of every model of this package
"""
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import timm

__all__ = ['count_params', 'count_macs', 'package_model_names', 'profile_table']


def count_params(model: nn.Module) -> int:
    """All parameters (trainable or not), BN running statistics excluded."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Optional[Tuple[int, int, int]] = None) -> int:
    """Multiply-accumulates of conv / linear layers for one image of ``input_size`` (default: pretrained_cfg)."""
    if input_size is None:
        input_size = model.pretrained_cfg['input_size']
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def package_model_names() -> Sequence[str]:
    """Names this package registers in timm (CIFAR models and the ImageNet ShuffleNetV2s)."""
    # Importing this module imported the package, whose family modules registered the models.
    return timm.list_models('cifar_*') + timm.list_models('shufflenetv2_x*')


def profile_table(num_classes: int = 100) -> Dict[str, Tuple[int, int]]:
    """``{name: (params, MACs)}`` with ``num_classes`` classes for CIFAR models, 1000 for ImageNet ones."""
    out = {}
    for name in package_model_names():
        n = num_classes if name.startswith('cifar_') else 1000
        model = timm.create_model(name, num_classes=n)
        out[name] = (count_params(model), count_macs(model))
    return out


def main() -> int:
    print('| model | input | classes | params | MACs |')
    print('|---|---|---|---:|---:|')
    for name, (params, macs) in profile_table().items():
        size = timm.create_model(name).pretrained_cfg['input_size']
        n = 100 if name.startswith('cifar_') else 1000
        print(f'| `{name}` | {size[1]}x{size[2]} | {n} | {params:,} ({params / 1e6:.2f}M) | {macs / 1e6:.1f}M |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
