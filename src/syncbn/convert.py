"""Swap BatchNorm layers of a model for :class:`~syncbn.SyncBatchNorm` and back.

Both directions share the parameter and buffer *tensors* with the layer they
replace (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so an
optimizer built before the swap keeps working, ``requires_grad``, device and
dtype are untouched, and a round trip is lossless.

Conversion never silently changes what a model computes. A layer is converted by
the first rule that applies:

1. a registered conversion for its exact class (:func:`register_conversion`;
   built in, when timm is importable: timm's ``BatchNormAct2d`` and
   ``SyncBatchNormAct``, see :mod:`syncbn.integrations.timm`);
2. ``torch.nn.SyncBatchNorm`` and any ``_BatchNorm`` subclass that behaves as the
   stock classes (BatchNorm1d/2d/3d, Lightning's and mmengine's ``_BatchNormXd``, a
   subclass that only changes ``__init__``): a plain :class:`SyncBatchNorm`;
3. any other ``_BatchNorm`` subclass: ``ValueError`` naming the path, the class and
   the fix. "Other" is: its own ``forward``; any other method, property or
   descriptor that replaces one of the stock classes' (``train``, ``eval``,
   ``_load_from_state_dict``, ``reset_parameters``, ``__call__``, ``__setattr__``,
   … — :func:`overridden_methods`), except the harmless :data:`ALLOWED_OVERRIDES`
   (``__init__``, ``extra_repr``, ``__repr__``, ``__str__``, ``_check_input_dim``);
   such a method replaced on the instance; extra parameters or buffers; a
   parametrization. Methods a subclass only *adds* are not counted: no stock code
   calls them, so a converted layer that lacks them fails loudly if anything does.
4. a BatchNorm inside TorchScript code (``torch.jit.script``, ``trace`` or ``load``;
   recognized by its class name) cannot be replaced: compiled code keeps its layer.
   In training mode it would normalize with this rank's batch only, so it is
   refused (``ValueError``); in eval mode it computes what a SyncBatchNorm would
   (the running statistics), so it is left as it is with a ``RuntimeWarning``
   naming its path (refusing it would break models that hold a frozen, loaded
   TorchScript part, e.g. a distillation teacher).

The whole tree is checked (and every new layer built) before the first layer is
replaced, so a call that raises leaves the model untouched.

Built-in rules for third-party libraries are registered lazily: ``import syncbn``
never imports them. When the converter meets a ``_BatchNorm`` subclass without a
rule whose class lives in a package listed in ``_INTEGRATIONS`` (``timm.*``), it
imports that integration module, which registers its rules (that package is
importable then: the model's class came from it), and looks again.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from . import _comm
from .modules import SyncBatchNorm

__all__ = [
    "ALLOWED_OVERRIDES",
    "convert_sync_batchnorm",
    "overridden_methods",
    "plain_layer_like",
    "register_conversion",
    "revert_sync_batchnorm",
    "sync_layer_like",
]

ToSync = Callable[[nn.Module, "_comm.ProcessGroup | None"], SyncBatchNorm]
"""``to_sync(layer, process_group)``: a new SyncBatchNorm (or subclass) computing as ``layer``."""
ToPlain = Callable[[SyncBatchNorm], nn.Module]
"""``to_plain(sync_layer)``: a new layer of the original class that computes as ``sync_layer``."""

_S = TypeVar("_S", bound=SyncBatchNorm)
_B = TypeVar("_B", bound=_BatchNorm)

_BY_NDIM: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d,
}
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_PARAMETERS = {"weight", "bias"}
_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}
_STOCK_CLASSES = (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                  *_BatchNorm.__mro__)
"""What a converted layer behaves as: torch's BatchNorm classes, nn.Module and object."""
_ALLOWED_SHOWN = ("__init__", "extra_repr", "__repr__", "__str__", "_check_input_dim")
ALLOWED_OVERRIDES = frozenset({*_ALLOWED_SHOWN, "__init_subclass__", "__subclasshook__"})
"""Methods a ``_BatchNorm`` subclass may define and still be converted.

``__init__`` only builds the layer (the converter copies what it built);
``extra_repr``/``__repr__``/``__str__`` only describe it; ``_check_input_dim``
only accepts or rejects an input rank, never changes a number (the converted
layer takes every rank 2–5, as it does for BatchNorm1d/2d/3d, whose checks it also
drops); ``__init_subclass__``/``__subclasshook__`` act on classes, not layers.
Anything else that replaces a stock method is refused (see the module docstring).
"""
_ALLOWED_TEXT = f"{', '.join(_ALLOWED_SHOWN[:-1])} and {_ALLOWED_SHOWN[-1]}"
_HOOK_DICTS = tuple(name for name in vars(nn.Module()) if "hook" in name)
"""nn.Module's per-instance hook registries; they move with the tensors."""
_INTEGRATIONS = {"timm": "syncbn.integrations.timm"}
"""Top-level package of a layer's class → the syncbn module that registers its rules."""
_REGISTER_HINT = (
    "syncbn.register_conversion({cls}, to_sync=..., to_plain=...) (see docs/converting.md)"
)


@dataclass(frozen=True)
class _Rule:
    to_sync: ToSync
    to_plain: ToPlain


_RULES: dict[type[nn.Module], _Rule] = {}


def register_conversion(source_cls: type[nn.Module], *, to_sync: ToSync, to_plain: ToPlain,
                        replace: bool = True) -> None:
    """Teach :func:`convert_sync_batchnorm` to convert layers of exactly ``source_cls``.

    ``to_sync(layer, process_group)`` returns a new :class:`SyncBatchNorm` (or a
    subclass) that computes what ``layer`` computes, sharing its tensors
    (:func:`sync_layer_like` does the sharing); ``layer`` itself must not be
    changed. The converter then records the path and ``source_cls`` on it and
    moves ``layer``'s children onto it. ``to_plain(sync_layer)`` is the way back,
    used by :func:`revert_sync_batchnorm` (:func:`plain_layer_like` helps); the
    children move back the same way. Subclasses of ``source_cls`` are not matched:
    each class gets its own rule.

    ``replace=False`` keeps a rule already registered for ``source_cls`` (the
    built-in integrations register that way, so a user's rule always wins).

    Raises:
        TypeError: ``source_cls`` is not an ``nn.Module`` subclass, or a function
            is not callable.
    """
    if not (isinstance(source_cls, type) and issubclass(source_cls, nn.Module)):
        raise TypeError(
            f"register_conversion expected source_cls to be an nn.Module subclass, got "
            f"{source_cls!r}; pass the class itself, e.g. register_conversion(MyBatchNorm, ...)"
        )
    for arg, value in (("to_sync", to_sync), ("to_plain", to_plain)):
        if not callable(value):
            raise TypeError(
                f"register_conversion expected {arg} to be callable, got "
                f"{type(value).__name__}; pass a function, e.g. {arg}=lambda layer, ...: ..."
            )
    if replace or source_cls not in _RULES:
        _RULES[source_cls] = _Rule(to_sync, to_plain)


def _rule_for(cls: type[nn.Module]) -> _Rule | None:
    """The registered rule for exactly ``cls``, loading the integration of its package once."""
    rule = _RULES.get(cls)
    if rule is None:
        integration = _INTEGRATIONS.get(cls.__module__.partition(".")[0])
        if integration is not None:
            importlib.import_module(integration)  # registers its rules on import
            rule = _RULES.get(cls)
    return rule


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --- which subclasses behave as the stock classes ------------------------------------------


def _is_behaviour(value: object) -> bool:
    """A method, property or other descriptor (what a class attribute *does*), not data.

    ``__dict__``/``__weakref__``/``__slots__`` entries (getset and member descriptors)
    are the object's storage, not behaviour.
    """
    if isinstance(value, (types.GetSetDescriptorType, types.MemberDescriptorType)):
        return False
    return callable(value) or hasattr(type(value), "__get__")


def _defining(cls: type, name: str, among: Collection[type]) -> tuple[type, object] | None:
    """The first class of ``among``, in ``cls``'s MRO order, that defines ``name``; its value."""
    for klass in cls.__mro__:
        if klass in among and name in vars(klass):
            return klass, vars(klass)[name]
    return None


@functools.cache
def _stock_names(stock: tuple[type, ...], state: frozenset[str]) -> frozenset[str]:
    """Every attribute the stock classes define or annotate, plus ``state`` (instance names)."""
    names = set(state)
    for klass in stock:
        names.update(vars(klass))
        names.update(inspect.get_annotations(klass))  # not evaluated: only the names
    return frozenset(names)


def overridden_methods(cls: type, stock: Iterable[type], allowed: Collection[str],
                       state: Collection[str] = ()) -> list[str]:
    """The stock behaviour ``cls`` replaces, as sorted attribute names.

    A name counts when ``getattr(cls, name)`` finds a method, property or other
    descriptor in a class outside ``stock`` (a subclass or a mixin) that differs from
    what the ``stock`` classes give for that name, and the ``stock`` classes define or
    annotate it (or it is in ``state``, their instance attributes), unless it is in
    ``allowed``. Names only the subclass has are not counted: stock code never
    calls them. Both flavours' converters use this rule.
    """
    stock_tuple = tuple(stock)
    names = _stock_names(stock_tuple, frozenset(state))
    candidates = {n for klass in cls.__mro__ if klass not in stock_tuple for n in vars(klass)}
    found = []
    for name in sorted((candidates & names) - set(allowed)):
        klass, value = _defining(cls, name, cls.__mro__) or (object, None)
        if klass in stock_tuple or not _is_behaviour(value):
            continue
        original = _defining(cls, name, stock_tuple)
        if original is None or original[1] is not value:
            found.append(name)
    return found


def replaced_on_instance(layer: nn.Module, stock: Iterable[type]) -> list[str]:
    """Sorted names of stock methods that ``layer`` holds its own callable for, on the
    instance (``layer.train = ...``), which attribute lookup finds before the class's."""
    stock_tuple = tuple(stock)
    found = []
    for name, value in vars(layer).items():
        original = _defining(type(layer), name, stock_tuple)
        if original is not None and _is_behaviour(original[1]) and callable(value):
            found.append(name)
    return sorted(found)


def _move_state(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the very parameter and buffer tensors of ``source``, its mode, qconfig
    and hooks."""
    for name in _PARAMETERS:
        setattr(target, name, getattr(source, name))
    for name in _BUFFERS:
        setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    for name in _HOOK_DICTS:
        if name in vars(source):
            setattr(target, name, vars(source)[name])


def sync_layer_like(layer: _BatchNorm, process_group: _comm.ProcessGroup | None = None,
                    cls: type[_S] = SyncBatchNorm) -> _S:  # type: ignore[assignment]
    """A new ``cls`` with ``layer``'s hyper-parameters, its very tensors, mode and hooks.

    ``cls`` takes SyncBatchNorm's constructor arguments. The group is
    ``process_group``, else ``layer.process_group`` when it has one (a
    ``torch.nn.SyncBatchNorm``), else the world. ``layer`` is not changed.
    """
    group = process_group if process_group is not None else getattr(
        layer, "process_group", None)
    output = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                 layer.track_running_stats, group, device="meta")
    _move_state(layer, output)
    return output


def plain_layer_like(layer: SyncBatchNorm, cls: type[_B]) -> _B:
    """A new ``cls`` (a ``_BatchNorm`` subclass) with ``layer``'s hyper-parameters and tensors.

    ``cls`` is built with ``(num_features, eps, momentum, affine,
    track_running_stats, device=...)``; a class with another constructor is built
    with its BatchNorm1d/2d/3d base's (BatchNorm2d's if it has none); both run the
    stock forward. ``layer`` is not changed.
    """
    args = (layer.num_features, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats)
    output: _B
    try:
        output = cls(*args, device="meta")
    except TypeError:  # a subclass with its own constructor: use its BatchNorm base
        base = next((c for c in cls.__mro__ if c in _BY_NDIM.values()), nn.BatchNorm2d)
        output = base(*args, device="meta")
    _move_state(layer, output)
    return output


# --- convert -------------------------------------------------------------------------------


def convert_sync_batchnorm(
    module: nn.Module, process_group: _comm.ProcessGroup | None = None
) -> nn.Module:
    """Replace every BatchNorm layer of ``module``'s tree by a :class:`SyncBatchNorm`.

    What is converted, and what is refused, is in this module's docstring. Returns
    ``module`` with the layers replaced in place, or the new layer when ``module``
    itself is one. Layers that already are :class:`syncbn.SyncBatchNorm` stay, and
    take ``process_group`` when one is given. Each converted layer records its path
    in the tree (``"layer1.0.bn1"``) so errors can name it, and the class it
    replaced, which :func:`revert_sync_batchnorm` restores. A layer shared by
    several parents stays one (shared) layer. As torch, it converts on every rank,
    also on a rank outside ``process_group`` (where ``new_group`` returned a
    placeholder): the layers there evaluate with their running statistics, and only
    a synchronized training forward raises, naming the layer.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``process_group`` is not a
            ProcessGroup, or a registered ``to_sync`` returned no SyncBatchNorm.
        ValueError: a lazy BatchNorm has not been initialized yet, or a layer's
            class cannot be converted without changing what it computes. Nothing
            was changed then.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"convert_sync_batchnorm expected an nn.Module, got {type(module).__name__}"
        )
    _comm.check_group_arg(process_group)
    new: dict[int, SyncBatchNorm] = {}
    for path, layer in module.named_modules():  # build everything before changing anything
        if not isinstance(layer, SyncBatchNorm):
            built = _convert_one(layer, process_group, path)
            if built is not None:
                new[id(layer)] = built

    def replace(layer: nn.Module, path: str) -> nn.Module:
        if isinstance(layer, SyncBatchNorm):
            if process_group is not None:
                layer.process_group = process_group
            layer._syncbn_name = layer._syncbn_name or path or None
            return layer
        return new.get(id(layer), layer)

    return replace_in_tree(module, replace)


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


def _convert_one(layer: nn.Module, process_group: _comm.ProcessGroup | None,
                 path: str) -> SyncBatchNorm | None:
    """The new layer for ``layer``, None to keep it; raises when it cannot be converted."""
    cls = type(layer)
    where = f"'{path or '<root>'}'"
    if isinstance(layer, torch.jit.ScriptModule):
        _check_scripted(layer, where)
        return None
    if isinstance(layer, LazyModuleMixin) and isinstance(layer, _BatchNorm):
        raise ValueError(
            f"convert_sync_batchnorm got an uninitialized {cls.__name__} at {where}: its "
            "number of channels is not known yet; run one forward pass first"
        )
    rule = _rule_for(cls) if isinstance(layer, _BatchNorm) else _RULES.get(cls)
    if rule is not None:
        output = rule.to_sync(layer, process_group)
        if not isinstance(output, SyncBatchNorm):
            raise TypeError(
                f"convert_sync_batchnorm: the conversion registered for {_qualname(cls)} "
                f"returned a {type(output).__name__} for {where}, expected a "
                "syncbn.SyncBatchNorm (or a subclass); fix its to_sync function"
            )
    elif isinstance(layer, _BatchNorm):
        _check_stock(layer, where)
        output = sync_layer_like(layer, process_group)
    else:
        return None
    output._syncbn_source_cls = cls  # type: ignore[assignment]
    output._syncbn_name = path or None
    return output


def _check_stock(layer: _BatchNorm, where: str) -> None:
    """A ``_BatchNorm`` without a rule converts only if a plain SyncBatchNorm computes the same."""
    cls = type(layer)
    params, buffers = set(layer._parameters), set(layer._buffers)
    overridden = overridden_methods(cls, _STOCK_CLASSES, ALLOWED_OVERRIDES,
                                    _PARAMETERS | _BUFFERS | {"process_group"})
    replaced = replaced_on_instance(layer, _STOCK_CLASSES)
    if cls.forward not in _STOCK_FORWARDS:
        problem = "class has its own forward, which a SyncBatchNorm would not run"
    elif parametrize.is_parametrized(layer):
        problem = "layer is parametrized (torch.nn.utils.parametrize), which would be dropped"
    elif overridden:
        problem = (f"class overrides {', '.join(overridden)}, which a SyncBatchNorm would not "
                   f"run (a subclass converts when it changes at most {_ALLOWED_TEXT})")
    elif replaced:
        problem = (f"layer's {', '.join(replaced)} {'was' if len(replaced) == 1 else 'were'} "
                   "replaced on the instance; a SyncBatchNorm would not run it")
    elif params != _PARAMETERS or buffers != _BUFFERS:
        odd = sorted(params ^ _PARAMETERS) + sorted(buffers ^ _BUFFERS)
        problem = (f"class has parameters or buffers that differ from BatchNorm's "
                   f"({', '.join(odd)}), so the state_dict would change")
    else:
        return
    raise ValueError(
        f"convert_sync_batchnorm cannot convert {where} ({_qualname(cls)}): the {problem}. "
        f"Fix: register how to convert it with {_REGISTER_HINT.format(cls=cls.__name__)}, or "
        "replace that layer yourself before converting. Nothing was converted."
    )


def _all_batchnorm_classes() -> list[type]:
    """``_BatchNorm`` and every subclass of it defined so far in this process."""
    found: list[type] = []
    todo: list[type] = [_BatchNorm]
    while todo:
        klass = todo.pop()
        found.append(klass)
        todo.extend(klass.__subclasses__())
    return found


def _check_scripted(layer: nn.Module, where: str) -> None:
    """Refuse a TorchScript BatchNorm in training mode; warn about one in eval (module doc)."""
    name = getattr(layer, "original_name", None)
    if name not in {klass.__name__ for klass in _all_batchnorm_classes()}:
        return
    what = f"{where} (a TorchScript {name}, from torch.jit.script, trace or load)"
    if layer.training:
        raise ValueError(
            f"convert_sync_batchnorm cannot convert {what}: compiled TorchScript code keeps "
            "its own layer, which would go on normalizing with this rank's batch only, so "
            "its statistics would silently not be synchronized. Fix: keep that part a "
            "Python module while training (script or trace it for deployment after "
            "syncbn.revert_sync_batchnorm), or, if it is frozen, call .eval() on it before "
            "converting (it then uses its running statistics, as a SyncBatchNorm would). "
            "Nothing was converted."
        )
    warnings.warn(
        f"convert_sync_batchnorm leaves {what} as it is: compiled TorchScript code cannot be "
        "changed. It is in eval mode, where it computes what a SyncBatchNorm would (the "
        "running statistics); in training mode it would normalize with this rank's batch "
        "only. Keep it in eval mode (call .eval() on it again after model.train()).",
        RuntimeWarning, stacklevel=4,
    )


# --- revert --------------------------------------------------------------------------------


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`syncbn.SyncBatchNorm` in the tree by the layer it was converted from.

    The class is the one ``convert_sync_batchnorm`` replaced (through its
    registered conversion, if any; ``torch.nn.SyncBatchNorm`` becomes
    BatchNorm1d/2d/3d); otherwise it is inferred from the rank of the last input
    the layer saw (2 or 3 → 1d, 4 → 2d, 5 → 3d) when recorded, otherwise
    BatchNorm2d. Parameters and buffers are shared, so the result runs, and
    exports, anywhere torch does.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: a layer has a fused activation, or is a SyncBatchNorm subclass
            with its own forward (or another overridden method, as for converting)
            and no registered way back. Nothing was changed then.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"revert_sync_batchnorm expected an nn.Module, got {type(module).__name__}")
    new = {id(layer): _revert_one(layer) for layer in module.modules()
           if isinstance(layer, SyncBatchNorm)}
    return replace_in_tree(module, lambda layer, _path: new.get(id(layer), layer))


def _revert_one(layer: SyncBatchNorm) -> nn.Module:
    label = _comm.layer_label(layer.layer_name)
    if not layer.activation.is_identity:
        raise ValueError(
            f"revert_sync_batchnorm cannot express {label}'s fused "
            f"activation={layer.activation.name!r} with a BatchNorm layer; build the "
            "model with activation='identity' and a separate activation module (e.g. "
            "nn.LeakyReLU) to revert it"
        )
    source: type[nn.Module] | None = getattr(layer, "_syncbn_source_cls", None)
    rule = None if source is None else _rule_for(source)
    if rule is not None:
        return rule.to_plain(layer)
    overridden = overridden_methods(type(layer), SyncBatchNorm.__mro__, ALLOWED_OVERRIDES)
    if type(layer).forward is not SyncBatchNorm.forward or overridden:
        what = "its own forward" if "forward" in overridden else (
            f"its own {', '.join(overridden)}")
        raise ValueError(
            f"revert_sync_batchnorm cannot revert {label} ({_qualname(type(layer))}): the "
            f"class has {what} and no registered way back. Fix: register one with "
            f"{_REGISTER_HINT.format(cls=getattr(source, '__name__', 'SourceClass'))}"
        )
    if (source is not None and issubclass(source, _BatchNorm)
            and not issubclass(source, nn.SyncBatchNorm)):
        return plain_layer_like(layer, source)
    ndim: int | None = getattr(layer, "_syncbn_input_ndim", None)
    return plain_layer_like(layer, _BY_NDIM[ndim] if ndim is not None else nn.BatchNorm2d)


SyncBatchNorm.convert_sync_batchnorm = staticmethod(convert_sync_batchnorm)
