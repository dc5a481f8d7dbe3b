"""CIFAR Wide ResNets of the KD literature: WRN-16-1, WRN-16-2, WRN-40-1, WRN-40-2.

WRN-d-k of Zagoruyko & Komodakis (2016): a 3x3 stem with 16 channels, three stages of
``n = (d - 4) / 6`` pre-activation basic blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3) with widths
16k, 32k, 64k at strides 1, 2, 2, then BN-ReLU, global average pooling and a linear layer.
A block whose width changes has a 1x1 conv shortcut (no BN) fed by the block's pre-activated
input; an unchanged block adds its raw input. The KD literature uses no dropout.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import cifar_cfg, init_weights, rename_keys
from ._head import ClassifierMixin
from ._stages import ThreeStageMixin

__all__ = ['CifarWideResNet', 'PreActBlock']


class PreActBlock(nn.Module):
    """Pre-activation wide basic block.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv (and of the shortcut conv).
        drop_rate: Dropout between the two convs (0 in the KD literature).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0. else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        # The KD literature's WRN projects only when the width changes (a stride-2 block without a width
        # change would add an unmatched identity; no WRN-d-k config has one).
        self.shortcut = None
        if in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)
        elif stride != 1:
            raise ValueError('PreActBlock: a stride-2 block must change the width (in_chs != out_chs)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # Projection blocks take the shortcut from the pre-activated input, identity blocks from x itself.
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + shortcut


class CifarWideResNet(ThreeStageMixin, ClassifierMixin, nn.Module):
    """Wide ResNet WRN-depth-widen for CIFAR.

    Args:
        depth: Total depth, ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: Width multiplier k of the three stages (16k, 32k, 64k).
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        block_drop_rate: Dropout inside each block (WRN paper option; 0 in the KD literature).
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            depth: int = 16,
            widen_factor: int = 2,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            block_drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f'depth: expected 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}')
        if widen_factor < 1:
            raise ValueError(f'widen_factor: expected an integer >= 1, got {widen_factor}')
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_chans = in_chans
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=16, reduction=1, module='conv1')]
        in_chs, reduction = 16, 1
        for i, (out_chs, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(PreActBlock(in_chs, out_chs, stride if j == 0 else 1, block_drop_rate, **dd))
                in_chs = out_chs
            reduction *= stride
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            if i < 2:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{i + 1}'))
        # Pre-activation nets end with BN-ReLU; the last stage's feature is taken after it.
        self.norm = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module='act'))

        self._init_head(in_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1',
            blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
            head_norm=r'^norm',
        )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)  # pre-activation: the stem is a bare conv

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))

    def _prune_tail(self) -> None:
        self.norm, self.act = nn.Identity(), nn.Identity()


# mdistiller / RepDistiller `wrn.py` names -> ours.
MDISTILLER_RULES: List = [
    (r'^module\.', ''),
    (r'^block(\d)\.layer\.', r'layer\1.'),
    (r'\.convShortcut\.', '.shortcut.'),
    (r'^bn1\.', 'norm.'),
]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller WRN state dict to this module's names."""
    return rename_keys(state_dict, MDISTILLER_RULES)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarWideResNet:
    return build_model_with_cfg(
        CifarWideResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


default_cfgs = generate_default_cfgs({
    name: cifar_cfg() for name in ('cifar_wrn_16_1', 'cifar_wrn_16_2', 'cifar_wrn_40_1', 'cifar_wrn_40_2')
})


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-16-1 for CIFAR (mdistiller ``wrn_16_1``)."""
    return _create('cifar_wrn_16_1', pretrained, **dict(dict(depth=16, widen_factor=1), **kwargs))


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-16-2 for CIFAR (mdistiller ``wrn_16_2``)."""
    return _create('cifar_wrn_16_2', pretrained, **dict(dict(depth=16, widen_factor=2), **kwargs))


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-1 for CIFAR (mdistiller ``wrn_40_1``)."""
    return _create('cifar_wrn_40_1', pretrained, **dict(dict(depth=40, widen_factor=1), **kwargs))


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WRN-40-2 for CIFAR (mdistiller ``wrn_40_2``)."""
    return _create('cifar_wrn_40_2', pretrained, **dict(dict(depth=40, widen_factor=2), **kwargs))
