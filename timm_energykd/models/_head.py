"""The timm classifier-head API shared by every family: pool -> dropout -> ``fc``."""
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import create_classifier, get_device_dtype

__all__ = ['ClassifierMixin']


class ClassifierMixin:
    """Classifier head of the families here, with timm's attributes and methods.

    A family calls ``_init_head`` at the end of ``__init__`` (after its feature modules, so timm's
    feature wrappers see the modules in forward order) and implements ``forward_features``.
    ``num_features`` is the width of the unpooled features; ``head_hidden_size`` that of ``pre_logits``
    (twice as wide with ``global_pool='catavgmax'``), as in timm's own CNNs.
    """
    num_classes: int
    num_features: int
    head_hidden_size: int
    drop_rate: float

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   device=None, dtype=None) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.global_pool, self.fc = create_classifier(
            num_features, num_classes, pool_type=global_pool, device=device, dtype=dtype)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        # A new head lives where the model lives (a bf16 / meta / GPU model gets a bf16 / meta / GPU head).
        dd = get_device_dtype(self)
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _prune_head_to(self, num_chs: int, prune_end: bool, prune_head: bool) -> None:
        """Bookkeeping of ``prune_intermediate_layers``: features that now end at an earlier tap have its
        width, and the head (sized for the final features) goes with them."""
        if prune_end:
            self.num_features = self.head_hidden_size = num_chs
        if prune_head or prune_end:
            self.reset_classifier(0, '')

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
