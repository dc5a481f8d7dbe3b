"""ShuffleNetV2 for CIFAR (KD literature, mdistiller ``ShuffleV2``) and for ImageNet (x0.5 ... x2.0).

ShuffleNetV2 (Ma et al., 2018): three stages of units whose first unit halves the resolution, then
a 1x1 conv, global average pooling and one linear layer.
* Basic unit: split the channels in halves; the second half goes through 1x1 conv-BN-ReLU,
  3x3 depthwise conv-BN, 1x1 conv-BN-ReLU and is concatenated after the untouched first half;
  then a 2-group channel shuffle.
* Down-sampling unit: left branch 3x3 depthwise stride-2 conv-BN, 1x1 conv-BN-ReLU; right branch
  1x1 conv-BN-ReLU, 3x3 depthwise stride-2 conv-BN, 1x1 conv-BN-ReLU; each gives half the output
  width; concatenate [left, right], 2-group shuffle.
* ImageNet: 3x3 stride-2 stem conv (24 ch) + 3x3 stride-2 max-pool; stages of 4, 8, 4 units with
  widths (48, 96, 192) x0.5, (116, 232, 464) x1.0, (176, 352, 704) x1.5, (244, 488, 976) x2.0 and a
  1024-channel last conv (2048 for x2.0).
* CIFAR (KD literature): 1x1 stride-1 stem conv (24 ch) without max-pool, x1.0 widths, 1024-channel
  last conv; a 32x32 image ends at 4x4.
The ImageNet models compute exactly what torchvision's ``shufflenet_v2_x*`` compute, and their state
dicts load through ``checkpoint_filter_fn`` (e.g. ``pretrained_cfg_overlay=dict(file=<torchvision .pth>)``).
"""
import re
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import channel_shuffle, cifar_cfg, imagenet_cfg, init_weights, rename_keys
from ._head import ClassifierMixin
from ._stages import ThreeStageMixin

__all__ = ['ShuffleNetV2', 'ShuffleV2Unit', 'ShuffleV2DownUnit']


class ShuffleV2Unit(nn.Module):
    """Stride-1 ShuffleNetV2 unit (channel split, one branch, concat, shuffle).

    Args:
        chs: Input = output channels (even).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if chs % 2:
            raise ValueError(f'chs: a ShuffleNetV2 unit needs an even channel count, got {chs}')
        half = chs // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(half, **dd)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(half, **dd)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(half, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = self.act(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.act(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], dim=1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 ShuffleNetV2 unit with two branches of ``out_chs // 2`` channels each.

    Args:
        in_chs: Input channels.
        out_chs: Output channels (even).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if out_chs % 2:
            raise ValueError(f'out_chs: a ShuffleNetV2 unit needs an even channel count, got {out_chs}')
        mid = out_chs // 2
        # left branch
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.conv2 = nn.Conv2d(in_chs, mid, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        # right branch
        self.conv3 = nn.Conv2d(in_chs, mid, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(mid, **dd)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False, **dd)
        self.bn4 = nn.BatchNorm2d(mid, **dd)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False, **dd)
        self.bn5 = nn.BatchNorm2d(mid, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.act(self.bn3(self.conv3(x)))
        right = self.act(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleNetV2(ThreeStageMixin, ClassifierMixin, nn.Module):
    """ShuffleNetV2 with a CIFAR or ImageNet stem.

    Args:
        widths: Output channels of the three stages.
        depths: Units per stage, the down-sampling unit included (4, 8, 4).
        head_chs: Channels of the last 1x1 conv.
        stem: 'imagenet' (3x3 stride-2 conv + max-pool) or 'cifar' (1x1 stride-1 conv, no pool).
        stem_chs: Channels of the stem conv.
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            widths: Sequence[int] = (116, 232, 464),
            depths: Sequence[int] = (4, 8, 4),
            head_chs: int = 1024,
            stem: str = 'imagenet',
            stem_chs: int = 24,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if stem not in ('imagenet', 'cifar'):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        self.in_chans = in_chans
        self.grad_checkpointing = False
        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=2, padding=1, bias=False, **dd)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        reduction = 2 if stem == 'imagenet' else 1
        self.feature_info = [dict(num_chs=stem_chs, reduction=reduction, module='act1')]
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == 'imagenet' else nn.Identity()
        reduction *= 2 if stem == 'imagenet' else 1

        in_chs = stem_chs
        for i, (w, d) in enumerate(zip(widths, depths)):
            units = [ShuffleV2DownUnit(in_chs, w, **dd)] + [ShuffleV2Unit(w, **dd) for _ in range(d - 1)]
            in_chs = w
            reduction *= 2
            self.add_module(f'layer{i + 1}', nn.Sequential(*units))
            if i < 2:
                self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f'layer{i + 1}'))
        self.conv2 = nn.Conv2d(in_chs, head_chs, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(head_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.feature_info.append(dict(num_chs=head_chs, reduction=reduction, module='act2'))

        self._init_head(head_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1',
            blocks=[(r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None), (r'^conv2|bn2', (99999,))],
        )

    # the stem tap is taken before the ImageNet max-pool; the last tap after the 1x1 conv (as feature_info)
    def forward_stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(x)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(x)))

    def _prune_stem_pool(self) -> None:
        self.maxpool = nn.Identity()

    def _prune_tail(self) -> None:
        self.conv2, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()


# mdistiller / RepDistiller `ShuffleNetv2.py` names -> ours (only the classifier differs).
MDISTILLER_RULES: List = [(r'^module\.', ''), (r'^linear\.', 'fc.')]

# torchvision `shufflenet_v2_x*` names -> ours (same architecture, ImageNet weights). Its down-sampling
# units hold branch1 = our left branch and branch2 = our right branch; its stride-1 units only branch2.
_TV_SEQ = {
    'branch1': {0: 'conv1', 1: 'bn1', 2: 'conv2', 3: 'bn2'},
    'down_branch2': {0: 'conv3', 1: 'bn3', 3: 'conv4', 4: 'bn4', 5: 'conv5', 6: 'bn5'},
    'branch2': {0: 'conv1', 1: 'bn1', 3: 'conv2', 4: 'bn2', 5: 'conv3', 6: 'bn3'},
}


def _map_torchvision_key(key: str) -> str:
    m = re.match(r'^stage(\d)\.(\d+)\.(branch[12])\.(\d+)\.(.*)$', key)
    if m is not None:
        stage, unit, branch, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        table = _TV_SEQ['down_branch2' if branch == 'branch2' and unit == 0 else branch]
        return f'layer{stage - 1}.{unit}.{table[idx]}.{rest}'
    for src, dst in (('conv1.0.', 'conv1.'), ('conv1.1.', 'bn1.'), ('conv5.0.', 'conv2.'), ('conv5.1.', 'bn2.')):
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller ``ShuffleV2`` or a torchvision ``shufflenet_v2_x*`` state dict to ours."""
    state_dict = rename_keys(state_dict, MDISTILLER_RULES)
    if any(k.startswith('stage2.') for k in state_dict):
        state_dict = {_map_torchvision_key(k): v for k, v in state_dict.items()}
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    return build_model_with_cfg(
        ShuffleNetV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


default_cfgs = generate_default_cfgs({
    'cifar_shufflenetv2': cifar_cfg(pool_size=(4, 4)),
    'shufflenetv2_x0_5': imagenet_cfg(),
    'shufflenetv2_x1_0': imagenet_cfg(),
    'shufflenetv2_x1_5': imagenet_cfg(),
    'shufflenetv2_x2_0': imagenet_cfg(),
})


@register_model
def cifar_shufflenetv2(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x1.0 for CIFAR, 1x1 stem, no max-pool (mdistiller ``ShuffleV2``)."""
    model_args = dict(widths=(116, 232, 464), head_chs=1024, stem='cifar')
    return _create('cifar_shufflenetv2', pretrained, **dict(model_args, **kwargs))


@register_model
def shufflenetv2_x0_5(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x0.5 for ImageNet."""
    return _create('shufflenetv2_x0_5', pretrained, **dict(dict(widths=(48, 96, 192), head_chs=1024), **kwargs))


@register_model
def shufflenetv2_x1_0(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x1.0 for ImageNet."""
    return _create('shufflenetv2_x1_0', pretrained, **dict(dict(widths=(116, 232, 464), head_chs=1024), **kwargs))


@register_model
def shufflenetv2_x1_5(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x1.5 for ImageNet."""
    return _create('shufflenetv2_x1_5', pretrained, **dict(dict(widths=(176, 352, 704), head_chs=1024), **kwargs))


@register_model
def shufflenetv2_x2_0(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """ShuffleNetV2 x2.0 for ImageNet."""
    return _create('shufflenetv2_x2_0', pretrained, **dict(dict(widths=(244, 488, 976), head_chs=2048), **kwargs))
