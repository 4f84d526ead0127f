"""Paddle's ``ParamAttr`` and regularizers, and how the layers turn ``*_attr`` into parameters.

A Paddle layer takes ``weight_attr`` / ``bias_attr`` (``param_attr`` on the old
``BatchNorm``) as one of: ``None`` (defaults), ``False`` (no parameter), ``True``
(defaults), a :class:`ParamAttr`, a ``str`` (its name), an initializer, or a
regularizer. :func:`resolve_param_attr` turns any of these into a
:class:`ParamSpec`; :func:`create_parameter` builds, fills, registers and records
the parameter from it::

    spec = resolve_param_attr(weight_attr, arg_name="weight_attr",
                              default_initializer=Constant(1.0), when_false="absent")
    create_parameter(self, "weight", spec, (num_features,), dtype=dtype, device=device)

Where the attr is recorded: on the **module that owns the parameter**, in a dict
``module._paddle_param_attrs`` mapping the parameter's local name (``"weight"``)
to its :class:`ParamAttr`. :func:`attach_param_attr` writes it,
:func:`get_param_attr` and :func:`named_param_attrs` read it. It lives on the
module, not on the ``Parameter``, because ``torch.nn.Parameter.__deepcopy__``
drops a parameter's instance attributes (so ``copy.deepcopy(model)`` would
silently forget the learning-rate scales), while a module's own attributes
survive ``deepcopy``, ``pickle``/``torch.save`` and ``.to()``. A layer that moves
parameters to a new module (``convert_sync_batchnorm``) calls
:func:`copy_param_attrs` as well. ``syncbn.paddle_compat._optim`` reads the
records to build optimizer parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import torch
from torch import Tensor, nn

from ._initializers import Initializer

__all__ = [
    "PARAM_ATTRS_ATTRIBUTE",
    "InitializerLike",
    "L1Decay",
    "L2Decay",
    "ParamAttr",
    "ParamSpec",
    "WeightDecayRegularizer",
    "attach_param_attr",
    "copy_param_attrs",
    "create_parameter",
    "get_param_attr",
    "named_param_attrs",
    "resolve_param_attr",
    "run_initializer",
]

InitializerLike = Callable[[Tensor], object]
"""An initializer ``f(tensor)``: fills ``tensor`` in place and returns None or ``tensor``,
or returns a new tensor of the same shape and dtype, which is copied in (see
:func:`create_parameter`)."""

PARAM_ATTRS_ATTRIBUTE = "_paddle_param_attrs"
"""Name of the ``dict[str, ParamAttr]`` attribute that records attrs on a module."""


def finite_non_negative(value: object, who: str, name: str, example: str) -> float:
    """``value`` as a float; it must be a finite real number >= 0.

    Raises:
        TypeError: not a real number (``bool`` included).
        ValueError: negative, infinite or NaN. Both messages end with ``example``.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{who}: expected {name} to be a real number, got {type(value).__name__} "
            f"({value!r}). Fix: pass a float, e.g. {example}."
        )
    result = float(value)
    if not (math.isfinite(result) and result >= 0):
        raise ValueError(
            f"{who}: expected a finite {name} >= 0, got {result!r}. Fix: pass e.g. {example}."
        )
    return result


def _coeff(value: object, owner: str) -> float:
    return finite_non_negative(value, owner, "coeff", f"{owner}(1e-4)")


@dataclass(frozen=True)
class WeightDecayRegularizer:
    """Base class of :class:`L1Decay` and :class:`L2Decay` (``paddle.regularizer``)."""

    coeff: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff", _coeff(self.coeff, type(self).__name__))


class L1Decay(WeightDecayRegularizer):
    """L1 weight decay: the gradient gains ``coeff · sign(w)`` (loss term ``coeff · Σ|w|``).

    Torch optimizers have no L1 decay; add ``syncbn.paddle_compat.l1_penalty(model)``
    to the loss (see there).
    """


class L2Decay(WeightDecayRegularizer):
    """L2 weight decay: the gradient gains ``coeff · w`` (loss term ``coeff/2 · Σw²``).

    ``optimizer_param_groups`` maps it to the group's ``weight_decay=coeff``.
    """


@dataclass(frozen=True)
class ParamAttr:
    """How to create one parameter (``paddle.ParamAttr``), same arguments and defaults.

    Attributes:
        name: Paddle's parameter name; kept for reference, torch names parameters by
            attribute path.
        initializer: any :class:`Initializer`, or a callable ``f(tensor)`` that fills
            ``tensor`` in place or returns a new tensor of its shape and dtype (see
            :func:`create_parameter`). None means the layer's default.
        learning_rate: multiplies the optimizer's learning rate for this parameter.
        regularizer: :class:`L1Decay` / :class:`L2Decay`; overrides the optimizer's
            ``weight_decay`` for this parameter, as in Paddle.
        trainable: False creates the parameter with ``requires_grad=False``.
        do_model_average: recorded only (torch has no ModelAverage).
        need_clip: False leaves the parameter out of ``clippable_parameters``.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: ``learning_rate`` is negative or not finite.
    """

    name: str | None = None
    initializer: InitializerLike | None = None
    learning_rate: float = 1.0
    regularizer: WeightDecayRegularizer | None = None
    trainable: bool = True
    do_model_average: bool = True
    need_clip: bool = True

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(
                f"ParamAttr: expected name to be a str or None, got "
                f"{type(self.name).__name__} ({self.name!r}). Fix: pass name='my_weight'."
            )
        if self.initializer is not None:
            _check_initializer(self.initializer, "ParamAttr(initializer=...)")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, Real):
            raise TypeError(
                f"ParamAttr: expected learning_rate to be a real number, got "
                f"{type(lr).__name__} ({lr!r}). Fix: pass a float, e.g. learning_rate=0.1."
            )
        if not (math.isfinite(float(lr)) and float(lr) >= 0):
            raise ValueError(
                f"ParamAttr: expected a finite learning_rate >= 0 (a multiplier of the "
                f"optimizer's lr), got {float(lr)!r}. Fix: pass e.g. learning_rate=0.1."
            )
        object.__setattr__(self, "learning_rate", float(lr))
        if self.regularizer is not None and not isinstance(
            self.regularizer, WeightDecayRegularizer
        ):
            raise TypeError(
                f"ParamAttr: expected regularizer to be L1Decay, L2Decay or None, got "
                f"{type(self.regularizer).__name__}. Fix: pass e.g. regularizer=L2Decay(1e-4)."
            )
        for flag in ("trainable", "do_model_average", "need_clip"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise TypeError(
                    f"ParamAttr: expected {flag} to be a bool, got {type(value).__name__} "
                    f"({value!r}). Fix: pass {flag}=True or {flag}=False."
                )


def _check_initializer(value: object, where: str) -> None:
    if isinstance(value, type):
        raise TypeError(
            f"{where}: expected an initializer instance, got the class {value.__name__}. "
            f"Fix: instantiate it, e.g. {value.__name__}(...)."
        )
    if not callable(value):
        raise TypeError(
            f"{where}: expected an initializer (a callable that fills a tensor in place "
            "or returns a new one), "
            f"got {type(value).__name__} ({value!r}). Fix: pass e.g. Constant(1.0)."
        )


@dataclass(frozen=True)
class ParamSpec:
    """One parameter, resolved from a Paddle ``*_attr`` argument by :func:`resolve_param_attr`.

    Attributes:
        create: whether the layer has this parameter at all.
        initializer: the effective initial fill (the attr's, else the layer default).
        trainable: ``requires_grad`` of the parameter.
        attr: the :class:`ParamAttr` to record with :func:`attach_param_attr`.
    """

    create: bool
    initializer: InitializerLike
    trainable: bool
    attr: ParamAttr

    @property
    def learning_rate(self) -> float:
        """Multiplier of the optimizer's learning rate."""
        return self.attr.learning_rate

    @property
    def regularizer(self) -> WeightDecayRegularizer | None:
        """Per-parameter weight decay, overriding the optimizer's."""
        return self.attr.regularizer


_ATTR_KINDS = (
    "None, False, True, a ParamAttr, a str name, an initializer (e.g. Constant(1.0)) "
    "or a regularizer (L1Decay / L2Decay)"
)


def _to_param_attr(value: object, arg_name: str) -> ParamAttr | Literal[False]:
    """Paddle's ``ParamAttr._to_attr``: normalize one ``*_attr`` argument."""
    if value is None or value is True:
        return ParamAttr()
    if value is False:
        return False
    if isinstance(value, ParamAttr):
        return value
    if isinstance(value, str):
        return ParamAttr(name=value)
    if isinstance(value, WeightDecayRegularizer):
        return ParamAttr(regularizer=value)
    if isinstance(value, type):
        raise TypeError(
            f"{arg_name}: expected {_ATTR_KINDS}; got the class {value.__name__}. "
            f"Fix: pass an instance, e.g. {value.__name__}(...)."
        )
    if isinstance(value, Initializer) or callable(value):
        return ParamAttr(initializer=value)
    raise TypeError(
        f"{arg_name}: expected {_ATTR_KINDS}; got {type(value).__name__} ({value!r}). "
        f"Fix: pass e.g. {arg_name}=ParamAttr(learning_rate=0.5), or False for no parameter."
    )


def resolve_param_attr(
    value: object,
    *,
    arg_name: str,
    default_initializer: InitializerLike,
    when_false: Literal["absent", "frozen"],
) -> ParamSpec:
    """Resolve a Paddle ``weight_attr`` / ``bias_attr`` / ``param_attr`` value.

    ``None`` / ``True`` mean a default :class:`ParamAttr`; a ``str`` is its name; an
    initializer or regularizer is wrapped in one. ``False`` means, by ``when_false``:
    ``"absent"`` — no parameter (``BatchNorm``, ``BatchNorm1D/2D/3D``); ``"frozen"`` —
    a parameter filled by ``default_initializer`` with ``requires_grad=False``
    (``SyncBatchNorm``).

    Args:
        value: the user's argument.
        arg_name: its name, for error messages.
        default_initializer: the fill when the attr names none (Paddle: ``Constant(1.0)``
            for a BatchNorm weight, ``Constant(0.0)`` for a bias).
        when_false: what ``False`` means for this layer.

    Raises:
        TypeError: ``value`` is none of the accepted kinds.
        ValueError: ``when_false`` is not ``"absent"`` or ``"frozen"``.
    """
    if when_false not in ("absent", "frozen"):
        raise ValueError(
            f"resolve_param_attr: expected when_false='absent' or 'frozen', got "
            f"{when_false!r}. Fix: pass one of those."
        )
    _check_initializer(default_initializer, "resolve_param_attr(default_initializer=...)")
    attr = _to_param_attr(value, arg_name)
    if attr is False:
        frozen = ParamAttr(initializer=default_initializer, trainable=False)
        return ParamSpec(
            create=when_false == "frozen",
            initializer=default_initializer,
            trainable=False,
            attr=frozen,
        )
    initializer = default_initializer if attr.initializer is None else attr.initializer
    return ParamSpec(create=True, initializer=initializer, trainable=attr.trainable, attr=attr)


def create_parameter(
    module: nn.Module,
    name: str,
    spec: ParamSpec,
    shape: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Parameter | None:
    """Build the parameter ``spec`` describes, register it as ``module.<name>``, record its attr.

    When ``spec.create`` is False, registers ``None`` (as torch does for an absent
    affine parameter) and returns None. Otherwise creates a tensor of ``shape``,
    fills it with ``spec.initializer`` under ``torch.no_grad()`` (see
    :func:`run_initializer`), sets ``requires_grad=spec.trainable``, registers it and
    calls :func:`attach_param_attr`.

    Raises:
        ValueError: the initializer changed the tensor's shape, left it unwritten, or
            returned a tensor of another shape.
        TypeError: the initializer returned something other than None or a tensor of
            the parameter's dtype.
    """
    if not spec.create:
        module.register_parameter(name, None)
        return None
    data = torch.empty(tuple(shape), dtype=dtype, device=device)
    run_initializer(spec.initializer, data, f"create_parameter: the initializer of {name!r}")
    if tuple(data.shape) != tuple(shape):
        raise ValueError(
            f"create_parameter: the initializer of {name!r} changed its shape from "
            f"{tuple(shape)} to {tuple(data.shape)}. Fix: fill the tensor in place "
            "(e.g. tensor.fill_(...)), do not resize it."
        )
    param = nn.Parameter(data, requires_grad=spec.trainable)
    module.register_parameter(name, param)
    attach_param_attr(module, name, spec.attr)
    return param


def run_initializer(initializer: InitializerLike, data: Tensor, who: str) -> None:
    """Fill ``data`` with ``initializer(data)``, under ``torch.no_grad()``; never leave it unset.

    The initializer may (a) fill ``data`` in place and return None or a view of it
    (``data`` itself, ``data.data``, ``data.view(...)``), as :class:`Initializer` and
    ``torch.nn.init.*_`` do; or (b) return a **new** tensor, which must have
    ``data``'s shape and dtype and is copied into ``data`` (any device). Returning
    None without writing to ``data`` is an error: a floating ``data`` is pre-filled
    with NaN, and "unwritten" means its version counter did not move and it is still
    all NaN (a write through ``tensor.data`` moves no counter but changes the values).

    Raises:
        ValueError: None came back and ``data`` was not written, or the tensor that
            came back has another shape.
        TypeError: neither None nor a tensor came back, or a tensor of another dtype.
    """
    sentinel = data.is_floating_point() or data.is_complex()
    with torch.no_grad():
        if sentinel:
            data.fill_(math.nan)
        version = None if data.is_inference() else data._version
        result = initializer(data)
    expected = f"shape {tuple(data.shape)} and dtype {data.dtype}"
    if result is None:
        untouched = version is not None and data._version == version
        readable = sentinel and not data.is_meta
        if untouched and (not readable or bool(torch.isnan(data).all())):
            raise ValueError(
                f"{who} ({initializer!r}) returned None and did not write to the tensor it "
                "was given, so the parameter would hold no values. Fix: fill the tensor in "
                f"place (e.g. tensor.fill_(1.0), torch.nn.init.normal_(tensor)) or return a "
                f"new tensor of {expected}."
            )
        return
    if not isinstance(result, Tensor):
        raise TypeError(
            f"{who} ({initializer!r}) returned a {type(result).__name__}; expected None or "
            f"a torch.Tensor (the tensor it filled in place, or a new one of {expected}). "
            "Fix: fill the tensor in place and return it, or return torch.as_tensor(...)."
        )
    if result is data or _same_memory(result, data):
        return
    if result.shape != data.shape:
        raise ValueError(
            f"{who} ({initializer!r}) returned a tensor of shape {tuple(result.shape)}; "
            f"expected {expected} (the parameter's). Fix: return a tensor of shape "
            f"{tuple(data.shape)}, e.g. torch.randn(tensor.shape, dtype=tensor.dtype)."
        )
    if result.dtype != data.dtype:
        raise TypeError(
            f"{who} ({initializer!r}) returned a {result.dtype} tensor; expected {expected} "
            f"(the parameter's). Fix: return result.to({data.dtype}), or create it with "
            "dtype=tensor.dtype."
        )
    with torch.no_grad():
        data.copy_(result)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is a view of ``b``'s memory (``b.data``, ``b.view(...)``): filled in place."""
    return a.device == b.device and (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def attach_param_attr(module: nn.Module, name: str, attr: ParamAttr) -> None:
    """Record ``attr`` for ``module``'s parameter ``name`` (see the module docstring).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``attr`` not a :class:`ParamAttr`.
        ValueError: ``module`` has no parameter ``name`` (or it is None).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"attach_param_attr: expected an nn.Module, got {type(module).__name__}. "
            "Fix: pass the module that owns the parameter."
        )
    if not isinstance(attr, ParamAttr):
        raise TypeError(
            f"attach_param_attr: expected a ParamAttr, got {type(attr).__name__}. "
            "Fix: resolve the user's argument with resolve_param_attr and pass spec.attr."
        )
    if module._parameters.get(name) is None:
        present = sorted(k for k, v in module._parameters.items() if v is not None)
        raise ValueError(
            f"attach_param_attr: {type(module).__name__} has no parameter {name!r} "
            f"(its parameters: {present}). Fix: register the parameter first."
        )
    records: dict[str, ParamAttr] | None = module.__dict__.get(PARAM_ATTRS_ATTRIBUTE)
    if records is None:
        records = {}
        module.__dict__[PARAM_ATTRS_ATTRIBUTE] = records
    records[name] = attr


def get_param_attr(module: nn.Module, name: str) -> ParamAttr | None:
    """The :class:`ParamAttr` recorded for ``module``'s own parameter ``name``, or None."""
    records: dict[str, ParamAttr] | None = module.__dict__.get(PARAM_ATTRS_ATTRIBUTE)
    return None if records is None else records.get(name)


def copy_param_attrs(source: nn.Module, target: nn.Module) -> None:
    """Copy the attrs recorded on ``source`` to ``target`` for the parameters ``target`` has.

    For converters that move parameters from one layer to a new one.
    """
    records: dict[str, ParamAttr] = source.__dict__.get(PARAM_ATTRS_ATTRIBUTE) or {}
    for name, attr in records.items():
        if target._parameters.get(name) is not None:
            attach_param_attr(target, name, attr)


def named_param_attrs(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Parameter, ParamAttr | None]]:
    """Yield ``(qualified_name, parameter, attr_or_None)`` for each distinct parameter of ``model``.

    A parameter shared by several modules is yielded once, under its first name, with
    the first attr recorded for it by any of its owners.
    """
    found: dict[int, tuple[str, nn.Parameter, ParamAttr | None]] = {}
    for prefix, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            attr = get_param_attr(module, local_name)
            if id(param) not in found:
                full_name = f"{prefix}.{local_name}" if prefix else local_name
                found[id(param)] = (full_name, param, attr)
            elif found[id(param)][2] is None and attr is not None:
                found[id(param)] = (found[id(param)][0], param, attr)
    yield from found.values()
