"""MobileNetV2 for CIFAR as used in the KD literature (CRD / mdistiller ``mobile_half``).

The KD literature's "MobileNetV2" is width 0.5 with expansion 6: a stride-2 3x3 stem (16 ch),
seven inverted-residual stages (t, c, n, s) = (1,16,1,1), (6,24,2,1), (6,32,3,2), (6,64,4,2),
(6,96,3,1), (6,160,3,2), (6,320,1,1) with c scaled by the width (int(c * width)), a 1x1 conv to
1280 channels, global average pooling and one linear layer. Activations are ReLU (not ReLU6), and
unlike the ImageNet MobileNetV2 every block, even with t = 1, has the 1x1 expansion conv.
The total stride is 16, so a 32x32 image ends at 2x2.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm exports it from _features only

from ._common import cifar_cfg, init_weights, rename_keys
from ._head import ClassifierMixin

__all__ = ['CifarMobileNetV2', 'InvertedResidual']

# (expansion, channels, blocks, stride) per stage; expansion None = the model's expansion ratio.
_STAGES: Tuple[Tuple[Any, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> 3x3 depthwise -> BN -> ReLU -> 1x1 project -> BN, residual if shapes match.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Depthwise conv stride.
        expansion: Expansion ratio of the hidden width (``in_chs * expansion``).
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mid = in_chs * expansion
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return x + out if self.has_skip else out


class CifarMobileNetV2(ClassifierMixin, nn.Module):
    """MobileNetV2 for 32x32 inputs (KD-literature variant).

    Args:
        width_mult: Channel multiplier of the stem and stages (0.5 for the KD literature's model).
        expansion: Expansion ratio of stages 2-7 (6).
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            width_mult: float = 0.5,
            expansion: int = 6,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if width_mult <= 0:
            raise ValueError(f'width_mult: expected a positive multiplier, got {width_mult}')
        self.in_chans = in_chans
        self.grad_checkpointing = False
        stem_chs = int(32 * width_mult)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, stride=2, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='act1')]
        # stage_ends[k]: how many block stages have run at feature tap k (0: the stem)
        self.stage_ends = [0]

        stages = []
        in_chs, reduction = stem_chs, 2
        for i, (t, c, n, s) in enumerate(_STAGES):
            out_chs = int(c * width_mult)
            t = expansion if t is None else t
            stages.append(nn.Sequential(*[
                InvertedResidual(in_chs if j == 0 else out_chs, out_chs, s if j == 0 else 1, t, **dd) for j in range(n)]))
            in_chs = out_chs
            reduction *= s
            # Features at the end of each resolution (as in the KD literature: stages 2, 3, 5, 7).
            if i in (1, 2, 4, 6):
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'blocks.{i}'))
                self.stage_ends.append(i + 1)
        self.blocks = nn.Sequential(*stages)

        head_chs = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv_head = nn.Conv2d(in_chs, head_chs, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(head_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)

        self._init_head(head_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv_stem|bn1',
            blocks=[(r'^blocks\.(\d+)' if coarse else r'^blocks\.(\d+)\.(\d+)', None),
                    (r'^conv_head|bn2', (99999,))],
        )

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features and return the taps of ``feature_info`` (stem, ends of stages 2, 3, 5, 7).

        Args:
            x: Input image tensor.
            indices: Take the last n taps if int, all if None, the listed ones if a sequence.
            norm: Unused (the 1x1 head conv follows the last tap and is not a norm).
            stop_early: Stop after the last tap asked for.
            output_fmt: Shape of the taps; only 'NCHW'.
            intermediates_only: Only return the taps.

        Returns:
            The taps, or (final features, taps).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_indices = [self.stage_ends[i] for i in take_indices]
        max_index = self.stage_ends[max_index]

        feat_idx = 0  # block stages run so far; 0 is the stem
        x = self.act1(self.bn1(self.conv_stem(x)))
        if feat_idx in take_indices:
            intermediates.append(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice modules in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index]
        for feat_idx, stage in enumerate(blocks, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)  # per block, as forward_features
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        if feat_idx == self.stage_ends[-1]:
            x = self.act2(self.bn2(self.conv_head(x)))
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages after the last tap asked for, and the 1x1 head conv with them or with the head.

        Returns the tap indices (as ``feature_info``, not block stages).
        """
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_chs = self.feature_info[max_index]['num_chs']
        max_index = self.stage_ends[max_index]
        # the head conv follows the last tap and never feeds a tap (as timm's EfficientNet conv_head)
        prune_end = prune_norm or prune_head or max_index < len(self.blocks)
        self.blocks = self.blocks[:max_index]
        if prune_end:
            self.conv_head, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
        self._prune_head_to(num_chs, prune_end, prune_head)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x, flatten=True)  # per block
        else:
            x = self.blocks(x)
        return self.act2(self.bn2(self.conv_head(x)))


# mdistiller `mobilenetv2.py` names -> ours. Its blocks hold `conv` = Sequential(pw, bn, relu, dw, bn, relu,
# pwl, bn), so the parameterised indices are 0, 1, 3, 4, 6, 7.
MDISTILLER_RULES: List = [
    (r'^module\.', ''),
    (r'^conv1\.0\.', 'conv_stem.'),
    (r'^conv1\.1\.', 'bn1.'),
    (r'\.conv\.0\.', '.conv_pw.'),
    (r'\.conv\.1\.', '.bn1.'),
    (r'\.conv\.3\.', '.conv_dw.'),
    (r'\.conv\.4\.', '.bn2.'),
    (r'\.conv\.6\.', '.conv_pwl.'),
    (r'\.conv\.7\.', '.bn3.'),
    (r'^conv2\.0\.', 'conv_head.'),
    (r'^conv2\.1\.', 'bn2.'),
    (r'^classifier\.0\.', 'fc.'),
]


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller ``mobile_half`` state dict to this module's names."""
    return rename_keys(state_dict, MDISTILLER_RULES)


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    return build_model_with_cfg(
        CifarMobileNetV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'cifar_mobilenetv2': cifar_cfg(pool_size=(2, 2), first_conv='conv_stem'),
})


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """MobileNetV2 (width 0.5, expansion 6) for CIFAR: mdistiller ``mobile_half``, the KD papers' "MobileNetV2"."""
    return _create('cifar_mobilenetv2', pretrained, **dict(dict(width_mult=0.5, expansion=6), **kwargs))
