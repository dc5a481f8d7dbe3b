"""ShuffleNetV1 for CIFAR as used in the KD literature (CRD / mdistiller ``ShuffleV1``).

ShuffleNet (Zhang et al., 2018), g = 3 groups, adapted to 32x32: a 1x1 stem conv to 24 channels
(no stride, no max-pool), three stages of 4, 8, 4 bottleneck units with output widths 240, 480,
960, global average pooling and one linear layer. Each unit: grouped 1x1 conv to a quarter of its
output width -> BN -> ReLU -> channel shuffle -> 3x3 depthwise conv -> BN -> ReLU -> grouped 1x1
conv -> BN. The first unit of a stage has stride 2, concatenates a 3x3 stride-2 average-pooled
shortcut (so its convs produce ``width - in_chs`` channels), and the unit fed by the 24-channel
stem uses an ungrouped first 1x1 conv (24 channels cannot be split into 3 useful groups).
In the KD literature's version the depthwise conv is also followed by a ReLU.
"""
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import channel_shuffle, cifar_cfg, init_weights, rename_keys
from ._head import ClassifierMixin
from ._stages import ThreeStageMixin

__all__ = ['CifarShuffleNetV1', 'ShuffleV1Unit']


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 bottleneck unit.

    Args:
        in_chs: Input channels.
        out_chs: Channels produced by the unit's convs (for a stride-2 unit the shortcut's ``in_chs`` are
            concatenated, so the unit's output has ``out_chs + in_chs`` channels).
        stride: 1 (residual add) or 2 (average-pool shortcut, concatenated).
        groups: Groups of the 1x1 convs.
        first_groups: Groups of the first 1x1 conv (1 after the stem).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, first_groups: int,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if stride not in (1, 2):
            raise ValueError(f'stride: expected 1 or 2, got {stride}')
        mid = out_chs // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_chs, mid, 1, groups=first_groups, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        self.conv3 = nn.Conv2d(mid, out_chs, 1, groups=groups, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        if self.first_groups > 1:
            out = channel_shuffle(out, self.first_groups)
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        out = torch.cat([out, shortcut], dim=1) if self.stride == 2 else out + shortcut
        return self.act(out)


class CifarShuffleNetV1(ThreeStageMixin, ClassifierMixin, nn.Module):
    """ShuffleNetV1 for 32x32 inputs.

    Args:
        widths: Output channels of the three stages.
        depths: Units per stage.
        groups: Groups of the 1x1 convs.
        stem_chs: Channels of the 1x1 stem conv.
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            widths: Sequence[int] = (240, 480, 960),
            depths: Sequence[int] = (4, 8, 4),
            groups: int = 3,
            stem_chs: int = 24,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module='act1')]
        in_chs, reduction = stem_chs, 1
        for i, (w, d) in enumerate(zip(widths, depths)):
            units = []
            for j in range(d):
                first_groups = 1 if in_chs == stem_chs else groups
                if j == 0:
                    units.append(ShuffleV1Unit(in_chs, w - in_chs, 2, groups, first_groups, **dd))
                else:
                    units.append(ShuffleV1Unit(in_chs, w, 1, groups, first_groups, **dd))
                in_chs = w
            reduction *= 2
            self.add_module(f'layer{i + 1}', nn.Sequential(*units))
            self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f'layer{i + 1}'))

        self._init_head(in_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)


# mdistiller / RepDistiller `ShuffleNetv1.py` names -> ours (only the classifier differs).
MDISTILLER_RULES: List = [(r'^module\.', ''), (r'^linear\.', 'fc.')]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller ``ShuffleV1`` state dict to this module's names."""
    return rename_keys(state_dict, MDISTILLER_RULES)


default_cfgs = generate_default_cfgs({'cifar_shufflenetv1': cifar_cfg(pool_size=(4, 4))})


@register_model
def cifar_shufflenetv1(pretrained: bool = False, **kwargs) -> CifarShuffleNetV1:
    """ShuffleNetV1 (g=3, widths 240/480/960) for CIFAR (mdistiller ``ShuffleV1``)."""
    return build_model_with_cfg(
        CifarShuffleNetV1, 'cifar_shufflenetv1', pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)
