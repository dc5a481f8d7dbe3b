"""Features of the families built as stem -> ``layer1`` -> ``layer2`` -> ``layer3`` (ResNet, WRN, ShuffleNets).

Their four feature taps (``feature_info``) are: the stem, ``layer1``, ``layer2``, and ``layer3`` followed by
the family's tail (WRN's final BN-ReLU, ShuffleNetV2's 1x1 conv; nothing for ResNet / ShuffleNetV1), so
``forward_intermediates`` returns what ``features_only=True`` returns.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices  # timm exports it from _features only

__all__ = ['ThreeStageMixin']


class ThreeStageMixin:
    """``forward_features``, ``forward_intermediates`` and ``prune_intermediate_layers`` over stem + 3 stages.

    A family overrides the hooks where it differs: ``forward_stem`` (up to the stem tap), ``forward_stem_pool``
    (between the stem tap and ``layer1``), ``forward_tail`` (after ``layer3``, part of the last tap) and the
    matching ``_prune_stem_pool`` / ``_prune_tail``.
    """
    grad_checkpointing: bool
    num_taps = 4

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _prune_stem_pool(self) -> None:
        pass

    def _prune_tail(self) -> None:
        pass

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem_pool(self.forward_stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)  # per block
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return self.forward_tail(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features and return the taps of ``feature_info``.

        Args:
            x: Input image tensor.
            indices: Take the last n taps if int, all if None, the listed ones if a sequence.
            norm: Unused: a final norm here (WRN) belongs to the last tap, as in ``feature_info``.
            stop_early: Stop after the last tap asked for.
            output_fmt: Shape of the taps; only 'NCHW'.
            intermediates_only: Only return the taps.

        Returns:
            The taps, or (final features, taps).
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(self.num_taps, indices)
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.forward_stem_pool(x)

        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)  # per block, as forward_features
            else:
                x = stage(x)
            if feat_idx == self.num_taps - 1:
                x = self.forward_tail(x)
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
        """Remove the layers after the last tap asked for (and the head when ``prune_head``).

        ``prune_norm`` keeps WRN's final BN-ReLU: it belongs to the last tap. Returns the absolute tap indices.
        """
        take_indices, max_index = feature_take_indices(self.num_taps, indices)
        for name in ('layer1', 'layer2', 'layer3')[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity, so (flattened) checkpoint_seq can iterate it
        if max_index == 0:
            self._prune_stem_pool()
        prune_end = max_index < self.num_taps - 1
        if prune_end:
            self._prune_tail()
        self._prune_head_to(self.feature_info[max_index]['num_chs'], prune_end, prune_head)
        return take_indices
