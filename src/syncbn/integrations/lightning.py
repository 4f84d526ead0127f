"""Lightning: :class:`SyncBatchNormPlugin`, a ``LayerSync`` that uses syncbn's layer.

Lightning's ``Trainer(sync_batchnorm=True)`` converts with ``torch.nn.SyncBatchNorm``,
which refuses CPU modules ("SyncBatchNorm layers only work with GPU modules"). This
plugin converts with :func:`syncbn.convert_sync_batchnorm` instead, so synchronized
BatchNorm works on every device and backend (CPU with gloo, CUDA with NCCL)::

    from syncbn.integrations.lightning import SyncBatchNormPlugin

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn",
                      plugins=[SyncBatchNormPlugin()], sync_batchnorm=True)

How Lightning calls it: the parallel strategies (``ddp``, ``ddp_spawn``, ``ddp_fork``,
``fsdp``) call :meth:`~SyncBatchNormPlugin.apply` in ``setup`` on every rank, before
the precision plugin casts the module, it is moved to its device and wrapped (DDP,
FSDP), and only when fitting; they call :meth:`~SyncBatchNormPlugin.revert` in
``teardown`` on the same rank after fitting. With ``ddp_spawn`` the ranks are new
processes: the module you passed to ``fit`` is never converted in your process, it
gets the trained state dict of rank 0 (same keys: syncbn's layer is a drop-in).

This module imports Lightning (``lightning.pytorch``, and ``pytorch_lightning`` too
when installed, so the plugin is accepted by either package's ``Trainer``);
``import syncbn`` never does.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import TYPE_CHECKING

from torch import nn

from ..convert import convert_sync_batchnorm, revert_sync_batchnorm
from ..modules import SyncBatchNorm

__all__ = ["SyncBatchNormPlugin"]

_LAYER_SYNC_MODULES = ("lightning.pytorch.plugins.layer_sync",
                       "pytorch_lightning.plugins.layer_sync")


def _torch_sync_batchnorm_base() -> type:
    """``TorchSyncBatchNorm`` of every installed Lightning package, as one base class.

    Both packages check ``isinstance(plugin, TorchSyncBatchNorm)`` against their own
    class; deriving from both lets either ``Trainer`` accept the plugin together with
    ``sync_batchnorm=True``.
    """
    bases: list[type] = [
        importlib.import_module(name).TorchSyncBatchNorm
        for name in _LAYER_SYNC_MODULES
        if importlib.util.find_spec(name.split(".")[0]) is not None
    ]
    if not bases:
        raise ImportError(
            "syncbn.integrations.lightning needs Lightning, but neither 'lightning' nor "
            "'pytorch_lightning' is installed; install it with: pip install 'syncbn[lightning]'"
        )
    if len(bases) == 1:
        return bases[0]
    return types.new_class("_TorchSyncBatchNormBase", tuple(bases))


if TYPE_CHECKING:
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm as _Base
else:
    _Base = _torch_sync_batchnorm_base()


class SyncBatchNormPlugin(_Base):
    """A Lightning ``LayerSync`` converting BatchNorm layers to :class:`syncbn.SyncBatchNorm`.

    :meth:`apply` converts BatchNorm1d/2d/3d and ``torch.nn.SyncBatchNorm`` layers
    (and everything else :func:`syncbn.convert_sync_batchnorm` converts) to syncbn's
    layer, over the default process group; layers that already are syncbn's stay
    as they are. :meth:`revert` turns exactly the layers that :meth:`apply`
    converted back into the classes they had (:func:`syncbn.revert_sync_batchnorm`),
    sharing parameters and buffers, so after ``fit`` the module has its own
    BatchNorm classes and the trained state.

    It subclasses Lightning's ``TorchSyncBatchNorm``, so ``Trainer(sync_batchnorm=True,
    plugins=[SyncBatchNormPlugin()])`` is accepted (without the plugin, that flag
    selects torch's layer).
    """

    def __init__(self) -> None:
        super().__init__()
        self._converted: list[SyncBatchNorm] = []

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model``'s BatchNorm layers in place; return it (the new layer if it is one)."""
        before = {id(layer) for layer in model.modules() if isinstance(layer, SyncBatchNorm)}
        model = convert_sync_batchnorm(model)
        self._converted.extend(
            layer for layer in model.modules()
            if isinstance(layer, SyncBatchNorm) and id(layer) not in before
        )
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Give the layers :meth:`apply` converted their original classes back; return ``model``."""
        converted = {id(layer) for layer in self._converted}
        self._converted.clear()
        return _revert_some(model, converted)


def _revert_some(module: nn.Module, targets: set[int]) -> nn.Module:
    """Revert the syncbn layers of ``module``'s tree whose ``id`` is in ``targets``."""
    if isinstance(module, SyncBatchNorm) and id(module) in targets:
        return revert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, _revert_some(child, targets))
    return module
