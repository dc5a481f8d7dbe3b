"""CIFAR VGG-8/11/13/16/19 with BatchNorm, as used in the KD literature (CRD / mdistiller ``vggN_bn``).

Five stages of 3x3 conv (with bias) -> BN -> ReLU; stage widths 64, 128, 256, 512, 512 and
convs per stage (1,1,1,1,1) for VGG-8, (1,1,2,2,2) VGG-11, (2,2,2,2,2) VGG-13, (2,2,3,3,3)
VGG-16, (2,2,4,4,4) VGG-19. A 2x2 max-pool precedes stages 2, 3 and 4; on 32x32 inputs there is
no pool before stage 5 (the KD code adds it only for 64x64 inputs: ``pool_stage5=True``).
Global average pooling and one linear layer (512 -> classes) follow, no fully connected stack.
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm exports it from _features only

from ._common import cifar_cfg, init_weights
from ._head import ClassifierMixin

__all__ = ['CifarVGG', 'ConvBnAct', 'VggStage']

VGG_DEPTHS = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


class ConvBnAct(nn.Module):
    """3x3 conv (with bias, as in the KD literature's VGG) -> BN -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=True, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class VggStage(nn.Module):
    """Optional 2x2 max-pool followed by ``depth`` ConvBnAct blocks.

    Args:
        in_chs: Input channels.
        out_chs: Output channels of every conv in the stage.
        depth: Number of convs.
        pool: Whether the stage starts with a stride-2 max-pool.
        device, dtype: Where and in which dtype the parameters are created.
    """

    def __init__(self, in_chs: int, out_chs: int, depth: int, pool: bool, device=None, dtype=None):
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2) if pool else nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvBnAct(in_chs if i == 0 else out_chs, out_chs, device=device, dtype=dtype) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)  # per block
        return self.blocks(x)


class CifarVGG(ClassifierMixin, nn.Module):
    """VGG with BatchNorm for 32x32 inputs.

    Args:
        depths: Convs per stage (5 values).
        widths: Channels per stage (5 values).
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        pool_stage5: Max-pool before the fifth stage (the KD code does this for 64x64 inputs only).
        global_pool: timm pooling type for the head.
        drop_rate: Dropout before the classifier.
        device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
            self,
            depths: Sequence[int] = (1, 1, 1, 1, 1),
            widths: Sequence[int] = (64, 128, 256, 512, 512),
            num_classes: int = 100,
            in_chans: int = 3,
            pool_stage5: bool = False,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(depths) != 5 or len(widths) != 5:
            raise ValueError(f'depths / widths: expected 5 values each, got {tuple(depths)} / {tuple(widths)}')
        self.in_chans = in_chans
        self.feature_info = []
        stages = []
        in_chs, reduction = in_chans, 1
        for i, (d, w) in enumerate(zip(depths, widths)):
            pool = 0 < i < 4 or (i == 4 and pool_stage5)
            reduction *= 2 if pool else 1
            stages.append(VggStage(in_chs, w, d, pool, **dd))
            in_chs = w
            self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self._init_head(in_chs, num_classes, global_pool, drop_rate, **dd)
        init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features and return the stage outputs (the taps of ``feature_info``).

        Args:
            x: Input image tensor.
            indices: Take the last n stages if int, all if None, the listed ones if a sequence.
            norm: Unused (VGG has no final norm).
            stop_early: Stop after the last stage asked for.
            output_fmt: Shape of the taps; only 'NCHW'.
            intermediates_only: Only return the taps.

        Returns:
            The taps, or (final features, taps).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if torch.jit.is_scripting() or not stop_early:  # can't slice modules in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)  # the stage checkpoints its blocks itself
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages after the last one asked for (and the head when ``prune_head``)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        self.stages = self.stages[:max_index + 1]
        self._prune_head_to(self.feature_info[max_index]['num_chs'], prune_end, prune_head)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def _map_key(key: str) -> str:
    # mdistiller: blockS is one Sequential of [conv, bn, relu] * n without the last relu, so the k-th conv
    # of stage S sits at index 3k and its BN at 3k + 1.
    m = re.match(r'^block(\d)\.(\d+)\.(.*)$', key)
    if m is None:
        return key
    stage, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    layer = {0: 'conv', 1: 'bn'}.get(idx % 3)
    if layer is None:
        return key
    return f'stages.{stage}.blocks.{idx // 3}.{layer}.{rest}'


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module = None) -> Dict[str, Any]:
    """Map an mdistiller / RepDistiller ``vggN_bn`` state dict to this module's names."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r'^module\.', '', key)
        key = re.sub(r'^classifier\.', 'fc.', key)
        out[_map_key(key)] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarVGG:
    return build_model_with_cfg(
        CifarVGG, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    f'cifar_vgg{d}': cifar_cfg(pool_size=(4, 4), first_conv='stages.0.blocks.0.conv') for d in VGG_DEPTHS
})


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-8 with BN for CIFAR (mdistiller ``vgg8`` = ``vgg8_bn``)."""
    return _create('cifar_vgg8', pretrained, **dict(dict(depths=VGG_DEPTHS[8]), **kwargs))


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-11 with BN for CIFAR (mdistiller ``vgg11`` = ``vgg11_bn``)."""
    return _create('cifar_vgg11', pretrained, **dict(dict(depths=VGG_DEPTHS[11]), **kwargs))


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-13 with BN for CIFAR (mdistiller ``vgg13`` = ``vgg13_bn``)."""
    return _create('cifar_vgg13', pretrained, **dict(dict(depths=VGG_DEPTHS[13]), **kwargs))


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-16 with BN for CIFAR (mdistiller ``vgg16`` = ``vgg16_bn``)."""
    return _create('cifar_vgg16', pretrained, **dict(dict(depths=VGG_DEPTHS[16]), **kwargs))


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 with BN for CIFAR (mdistiller ``vgg19`` = ``vgg19_bn``)."""
    return _create('cifar_vgg19', pretrained, **dict(dict(depths=VGG_DEPTHS[19]), **kwargs))
