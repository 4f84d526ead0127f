"""Swap BatchNorm layers of a model for :class:`~syncbn.SyncBatchNorm` and back.

Both directions share the parameter and buffer *tensors* with the layer they
replace (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an
optimizer built before the swap keeps working, ``requires_grad``, device and
dtype are untouched, and a round trip is lossless.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import _comm
from .modules import SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BY_NDIM: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d,
}


def _move_state(source: _BatchNorm, target: _BatchNorm) -> _BatchNorm:
    """Give ``target`` the very parameter and buffer tensors of ``source``, its mode and qconfig."""
    target.weight = source.weight
    target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(
    module: nn.Module, process_group: _comm.ProcessGroup | None = None
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and ``torch.nn.SyncBatchNorm`` in ``module``'s tree.

    Returns ``module`` with the layers replaced in place, or the new layer when
    ``module`` itself is one. Layers that already are :class:`syncbn.SyncBatchNorm`
    stay, and take ``process_group`` when one is given. Each converted layer
    records its path in the tree (``"layer1.0.bn1"``) so errors can name it.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or ``process_group`` is not
            a ProcessGroup.
        ValueError: a lazy BatchNorm has not been initialized yet.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm expected an nn.Module, got {type(module).__name__}"
        )
    _comm.check_group_arg(process_group)
    return replace_in_tree(module, lambda layer, path: _convert_one(layer, process_group, path))


def replace_in_tree(module: nn.Module, replace: Callable[[nn.Module, str], nn.Module],
                    path: str = "") -> nn.Module:
    """Walk ``module``'s tree depth first; ``replace(layer, path)`` returns its substitute.

    The substitute (or the layer itself) is returned and takes the layer's
    children, each walked the same way; ``path`` is the dotted name in the tree
    (``""`` for the root). Both flavours' converters are this walk.
    """
    output = replace(module, path)
    for name, child in module.named_children():
        output.add_module(name, replace_in_tree(child, replace, f"{path}.{name}" if path else name))
    return output


def _convert_one(module: nn.Module, process_group: _comm.ProcessGroup | None,
                 path: str) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        if process_group is not None:
            module.process_group = process_group
        module._syncbn_name = module._syncbn_name or path or None
        return module
    if isinstance(module, LazyModuleMixin) and isinstance(module, _BatchNorm):
        raise ValueError(
            f"convert_sync_batchnorm got an uninitialized {type(module).__name__} at "
            f"'{path or '<root>'}': its number of channels is not known yet; run one "
            "forward pass first"
        )
    if not isinstance(module, _CONVERTIBLE):
        return module
    # a torch.nn.SyncBatchNorm keeps its own group unless one is given
    group = process_group if process_group is not None else getattr(
        module, "process_group", None)
    layer = SyncBatchNorm(
        module.num_features, module.eps, module.momentum, module.affine,
        module.track_running_stats, group, device="meta",
    )
    _move_state(module, layer)
    layer._syncbn_source_cls = type(module)
    layer._syncbn_name = path or None
    return layer


def _revert_class(layer: SyncBatchNorm) -> type[_BatchNorm]:
    """The class it came from, else the one the last input's rank implies, else BatchNorm2d."""
    source = layer._syncbn_source_cls
    if source is not None and issubclass(source, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return source
    if layer._syncbn_input_ndim is not None:
        return _BY_NDIM[layer._syncbn_input_ndim]
    return nn.BatchNorm2d


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`syncbn.SyncBatchNorm` in the tree by a plain BatchNorm1d/2d/3d.

    The class is the one ``convert_sync_batchnorm`` replaced; otherwise it is
    inferred from the rank of the last input the layer saw (2 or 3 → 1d,
    4 → 2d, 5 → 3d), otherwise BatchNorm2d. Parameters and buffers are shared,
    so the result runs, and exports, anywhere torch does.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"revert_sync_batchnorm expected an nn.Module, got {type(module).__name__}")
    return replace_in_tree(module, lambda layer, _path: _revert_one(layer))


def _revert_one(module: nn.Module) -> nn.Module:
    if not isinstance(module, SyncBatchNorm):
        return module
    if not module.activation.is_identity:
        raise ValueError(
            f"revert_sync_batchnorm cannot express {_comm.layer_label(module.layer_name)}'s "
            f"fused activation={module.activation.name!r} with a BatchNorm layer; build the "
            "model with activation='identity' and a separate activation module (e.g. "
            "nn.LeakyReLU) to revert it"
        )
    cls = _revert_class(module)
    args = (module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats)
    try:
        output = cls(*args, device="meta")
    except TypeError:  # a subclass with its own constructor: use its BatchNorm base
        base = next(c for c in cls.__mro__ if c in _BY_NDIM.values())
        output = base(*args, device="meta")
    return _move_state(module, output)
