"""CIFAR ResNets of the KD literature (CRD / mdistiller): ResNet-8 ... ResNet-110, ResNet8x4, ResNet32x4.

The CIFAR ResNet of He et al. (2016, Sec. 4.2): a 3x3 stem, three stages of ``n = (depth - 2) / 6``
basic blocks at strides 1, 2, 2, global average pooling and one linear layer. Widths are
(stem, stage1, stage2, stage3) = (16, 16, 32, 64); the "x4" models of the KD literature use
(32, 64, 128, 256), so their first block also has a 1x1 projection shortcut. Projection shortcuts
(1x1 conv + BN) are used wherever the shape changes. Module names equal mdistiller's, so its
checkpoints load with no renaming.
"""
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import cifar_cfg, init_weights, rename_keys
from ._head import ClassifierMixin
from ._stages import ThreeStageMixin

__all__ = ['CifarResNet', 'BasicBlock']


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between them, added to the shortcut, then ReLU.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv (and of the projection shortcut).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd),
                nn.BatchNorm2d(out_chs, **dd),
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(ThreeStageMixin, ClassifierMixin, nn.Module):
    """CIFAR ResNet with basic blocks.

    Args:
        depth: Total depth, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: Channels of (stem, stage1, stage2, stage3).
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            depth: int = 20,
            widths: Sequence[int] = (16, 16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f'depth: expected 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}')
        if len(widths) != 4:
            raise ValueError(f'widths: expected 4 values (stem, stage1, stage2, stage3), got {tuple(widths)}')
        blocks_per_stage = (depth - 2) // 6
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='act1')]
        in_chs, reduction = widths[0], 1
        for i, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(in_chs, out_chs, stride if j == 0 else 1, **dd))
                in_chs = out_chs
            reduction *= stride
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))

        self._init_head(in_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)


# mdistiller / RepDistiller names equal ours; only a DataParallel 'module.' prefix may need stripping.
MDISTILLER_RULES: List = [(r'^module\.', '')]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller CIFAR ResNet state dict to this module's names."""
    return rename_keys(state_dict, MDISTILLER_RULES)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


default_cfgs = generate_default_cfgs({
    name: cifar_cfg() for name in (
        'cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44',
        'cifar_resnet56', 'cifar_resnet110', 'cifar_resnet8x4', 'cifar_resnet32x4')
})

_X4 = (32, 64, 128, 256)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 for CIFAR (mdistiller ``resnet8``)."""
    return _create('cifar_resnet8', pretrained, **dict(dict(depth=8), **kwargs))


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-14 for CIFAR (mdistiller ``resnet14``)."""
    return _create('cifar_resnet14', pretrained, **dict(dict(depth=14), **kwargs))


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (mdistiller ``resnet20``)."""
    return _create('cifar_resnet20', pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (mdistiller ``resnet32``)."""
    return _create('cifar_resnet32', pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (mdistiller ``resnet44``)."""
    return _create('cifar_resnet44', pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (mdistiller ``resnet56``)."""
    return _create('cifar_resnet56', pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (mdistiller ``resnet110``)."""
    return _create('cifar_resnet110', pretrained, **dict(dict(depth=110), **kwargs))


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 with 4x widths (32, 64, 128, 256) (mdistiller ``resnet8x4``)."""
    return _create('cifar_resnet8x4', pretrained, **dict(dict(depth=8, widths=_X4), **kwargs))


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 with 4x widths (32, 64, 128, 256) (mdistiller ``resnet32x4``)."""
    return _create('cifar_resnet32x4', pretrained, **dict(dict(depth=32, widths=_X4), **kwargs))
