"""timm: convert ``BatchNormAct2d`` and ``SyncBatchNormAct`` without losing their activation.

Most timm families (EfficientNet, MobileNetV3, RegNet, DenseNet, ResNetV2, CSPNet,
DPN, VoVNet, Xception, Inception, RexNet, TResNet, FBNet, …) normalize with
``timm.layers.BatchNormAct2d``, a ``BatchNorm2d`` whose own forward runs batch
norm, then its ``drop`` child, then its ``act`` child. Both it and timm's own
``SyncBatchNormAct`` (a ``torch.nn.SyncBatchNorm`` that runs ``drop`` and ``act``
when it has them) become :class:`SyncBatchNormAct` here, which keeps those
children (any module: activations, DropBlock, Identity…) and runs them the same
way, with the same ``state_dict`` keys; :func:`syncbn.revert_sync_batchnorm` gives
back a ``BatchNormAct2d`` with the same children and tensors.

Importing this module imports timm and registers the two rules (keeping a rule the
user registered first). :func:`syncbn.convert_sync_batchnorm` imports it the first
time it meets a BatchNorm class from timm; ``import syncbn`` does not.
"""

from __future__ import annotations

from typing import Any

import timm.layers
from torch import Tensor, nn

from .. import _comm
from ..convert import plain_layer_like, register_conversion, sync_layer_like
from ..modules import SyncBatchNorm

__all__ = ["SyncBatchNormAct"]

BatchNormAct2d: Any = timm.layers.BatchNormAct2d
TimmSyncBatchNormAct: Any = timm.layers.SyncBatchNormAct


class SyncBatchNormAct(SyncBatchNorm):
    """:class:`syncbn.SyncBatchNorm`, then its ``drop`` child, then its ``act`` child.

    ``y = act(drop(sync_batch_norm(x)))``, each child applied only when the layer
    has it (as timm's ``SyncBatchNormAct``); ``convert_sync_batchnorm`` moves a
    ``BatchNormAct2d``'s ``drop`` and ``act`` here. Built by hand, it takes
    SyncBatchNorm's arguments plus keyword-only ``drop`` and ``act`` modules, and
    reverts to a ``BatchNormAct2d``.
    """

    def __init__(self, *args: Any, drop: nn.Module | None = None, act: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act
        self._syncbn_source_cls = BatchNormAct2d

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` as :class:`syncbn.SyncBatchNorm`, then ``drop``, then ``act``."""
        x = super().forward(input, mask)
        drop: nn.Module | None = getattr(self, "drop", None)
        if drop is not None:
            x = drop(x)
        act: nn.Module | None = getattr(self, "act", None)
        if act is not None:
            x = act(x)
        return x


def _to_sync(layer: nn.Module, process_group: _comm.ProcessGroup | None) -> SyncBatchNorm:
    """The children (``drop``, ``act``) are moved by the converter's walk."""
    return sync_layer_like(layer, process_group, SyncBatchNormAct)  # type: ignore[arg-type]


def _to_plain(layer: SyncBatchNorm) -> nn.Module:
    """A BatchNormAct2d; a child the layer lacks becomes Identity (not timm's default ReLU)."""
    output: nn.Module = plain_layer_like(layer, BatchNormAct2d)
    for name in ("drop", "act"):
        if getattr(layer, name, None) is None:
            setattr(output, name, nn.Identity())
    return output


for _cls in (BatchNormAct2d, TimmSyncBatchNormAct):
    register_conversion(_cls, to_sync=_to_sync, to_plain=_to_plain, replace=False)
