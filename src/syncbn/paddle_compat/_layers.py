r"""The Paddle-flavour BatchNorm layers: one N-d implementation and thin shells.

``BatchNorm1D/2D/3D`` differ only in the data formats and input ranks they accept;
``SyncBatchNorm`` adds the process group; the old-style ``BatchNorm`` adds ``act``,
``is_test`` and ``trainable_statistics``. What the arguments *mean* is decided in
``_semantics.py``; the numerics are the core's (``syncbn.functional``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import _comm
from .._activation import Activation
from .._autograd import inplace_blocker, inplace_weight_ok, is_recomputing
from .._checks import MAX_TIMEOUT_S, MIN_TIMEOUT_S, timeout_hint
from .._pickling import GroupPicklingMixin, check_group_travelled
from ..convert import overridden_methods, replace_in_tree, replaced_on_instance
from ..functional import call_site, local_fallback_applies
from . import _semantics
from ._activations import get_activation
from ._initializers import Constant
from ._param_attr import (
    PARAM_ATTRS_ATTRIBUTE,
    copy_param_attrs,
    create_parameter,
    resolve_param_attr,
)
from ._semantics import (
    LAYOUT_1D,
    LAYOUT_2D,
    LAYOUT_3D,
    LAYOUT_BATCHNORM,
    LAYOUT_SYNC,
    LayoutRule,
    StatsMode,
)

__all__ = ["BatchNorm", "BatchNorm1D", "BatchNorm2D", "BatchNorm3D", "SyncBatchNorm"]

_HALF = (torch.float16, torch.bfloat16)


def _check_features(value: object, layer: str, arg_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{layer}: expected {arg_name} to be an int (the number of channels C), got "
            f"{type(value).__name__} ({value!r}). Fix: pass e.g. {layer}(16)."
        )
    if value <= 0:
        raise ValueError(
            f"{layer}: expected {arg_name} > 0 (the number of channels C), got {value}. "
            f"Fix: pass the input's channel count, e.g. {layer}(16)."
        )
    return value


def _check_flag(value: object, layer: str, arg_name: str, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    accepted = "None, True or False" if allow_none else "True or False"
    raise TypeError(
        f"{layer}: expected {arg_name} to be {accepted}, got {type(value).__name__} "
        f"({value!r}). Fix: pass {arg_name}=True or {arg_name}=False."
    )


class _BatchNormBase(nn.Module):
    r"""Batch normalization in Paddle's conventions over C at dim 1 or last, for any rank.

    Per channel, over the ``m`` values of the batch (all ranks' for ``SyncBatchNorm``)::

        μ = (1/m)·Σx,   σ² = (1/m)·Σ(x − μ)²          (biased, also for the running stats)
        y = weight·(x − μ)/√(σ² + epsilon) + bias
        _mean ← momentum·_mean + (1 − momentum)·μ
        _variance ← momentum·_variance + (1 − momentum)·σ²

    ``momentum`` and ``epsilon`` act as their float32 roundings, as in Paddle (so
    float64 results agree with Paddle's). With running statistics,
    ``y = weight·(x − _mean)/√(_variance + epsilon) + bias`` and the gradients are
    those of this affine map. Which of the two a forward uses, and whether it updates
    ``_mean``/``_variance``, is ``_semantics.statistics_mode`` of the training flag
    and ``use_global_stats``. When the batch has exactly one value per channel in
    training, the input is returned unchanged and the statistics are not touched; an
    empty batch gives an empty output and unchanged statistics.

    Parameters and buffers, in ``state_dict`` order: ``weight`` (initially 1),
    ``bias`` (0), ``_mean`` (0), ``_variance`` (1); Paddle's names, so a Paddle state
    dict loads with ``load_state_dict``. There is no ``num_batches_tracked``.

    Unlike Paddle, every present trainable parameter gets its exact gradient when
    the other one is absent or frozen, and eval-mode batch statistics get the exact
    gradient of the forward (see ``_semantics``).

    Args:
        num_features: C, the number of channels.
        momentum: weight of the old running value in the update above, in [0, 1].
        epsilon: added to the variance.
        weight_attr, bias_attr: ``None``/``True``/a :class:`ParamAttr` (initializer,
            learning_rate, regularizer, trainable), a name, an initializer or a
            regularizer. ``False``: no such parameter (``None``; acts as scale 1 /
            shift 0) — on ``SyncBatchNorm`` a frozen parameter of ones / zeros.
        data_format: where C is (dim 1 or last); the accepted strings depend on the layer.
        use_global_stats: ``None``: batch statistics (updated) in training, running ones
            in eval; ``True``: always the running statistics, never updated;
            ``False``: always the batch statistics, updated even in eval.
        name: Paddle's layer name; kept for ``repr`` and error messages.

    Shape:
        Input and output of the same shape; channel-last input (``'NLC'``, ``'NHWC'``,
        ``'NDHWC'``) comes in and goes out channel-last: C is moved to dim 1 as a view,
        which for contiguous 4-D/5-D input is torch's channels_last memory format (a
        contiguous 3-D ``(N, L, C)`` is viewed as ``(N·L, C)``), so nothing is copied.

    Raises:
        TypeError: an argument or the input has the wrong type, or the input's dtype
            does not match the parameters'.
        ValueError: a bad value, an unknown data format, a wrong input rank or channel
            count (checked at forward: format first, then rank, then channels).
    """

    _layout: ClassVar[LayoutRule]
    _when_false: ClassVar[Literal["absent", "frozen"]] = "absent"
    _features_arg: ClassVar[str] = "num_features"
    _weight_arg: ClassVar[str] = "weight_attr"

    num_features: int
    momentum: float
    epsilon: float
    data_format: str
    use_global_stats: bool | None
    trainable_statistics: bool | None
    name: str | None
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    _mean: Tensor
    _variance: Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.9,
        epsilon: float = 1e-05,
        weight_attr: object = None,
        bias_attr: object = None,
        data_format: str = "NCHW",
        use_global_stats: bool | None = None,
        name: str | None = None,
        *,
        trainable_statistics: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layer = type(self).__name__
        _check_features(num_features, layer, self._features_arg)
        conventions = _semantics.conventions(momentum, epsilon, layer)  # validates
        self.__dict__["_syncbn_conventions"] = ((float(momentum), float(epsilon)), conventions)
        self._layout.channel_last(data_format)  # validates; checked again at forward
        _check_flag(use_global_stats, layer, "use_global_stats", allow_none=True)
        if name is not None and not isinstance(name, str):
            raise TypeError(
                f"{layer}: expected name to be a str or None, got {type(name).__name__} "
                f"({name!r}). Fix: pass name='bn1' or leave it out."
            )
        self.num_features = num_features
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.data_format = data_format
        self.use_global_stats = use_global_stats
        self.trainable_statistics = trainable_statistics
        self.name = name
        dtype = torch.get_default_dtype() if dtype is None else dtype
        for param, attr, arg, fill in (("weight", weight_attr, self._weight_arg, 1.0),
                                       ("bias", bias_attr, "bias_attr", 0.0)):
            spec = resolve_param_attr(attr, arg_name=f"{layer}: {arg}",
                                      default_initializer=Constant(fill),
                                      when_false=self._when_false)
            create_parameter(self, param, spec, (num_features,), dtype=dtype)
        self.register_buffer("_mean", torch.zeros(num_features, dtype=dtype))
        self.register_buffer("_variance", torch.ones(num_features, dtype=dtype))

    # --- forward ---------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (see the class docstring); same shape and layout out."""
        layer = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{layer} expected input to be a torch.Tensor, got {type(input).__name__}. "
                "Fix: convert it with torch.as_tensor(...)."
            )
        channel_last = self._layout.channel_last(self.data_format)
        self._layout.check_rank(input.dim())
        x = _semantics.to_channels_first(input, channel_last)
        self._check_input(x, tuple(input.shape), channel_last)
        mode = self._statistics_mode()
        group, site, call = self._synchronization(x, mode)
        y = _semantics.batch_norm(
            x, self._mean, self._variance, self.weight, self.bias, mode=mode,
            conventions=self._conventions(layer),
            process_group=group, site=site, inplace_activation=self._fused(x, mode),
            call=call,
        )
        return _semantics.from_channels_first(y, channel_last, tuple(input.shape))

    def _conventions(self, layer: str) -> _semantics.Conventions:
        """``momentum``/``epsilon`` translated, cached per value: compiled code reads the
        cache (a constant to ``torch.compile``), eager code refreshes it when they change."""
        key = (self.momentum, self.epsilon)
        cached: tuple[tuple[float, float], _semantics.Conventions] | None = \
            self.__dict__.get("_syncbn_conventions")
        if cached is not None and (torch.compiler.is_compiling() or cached[0] == key):
            return cached[1]
        value = _semantics.conventions(self.momentum, self.epsilon, layer)
        self.__dict__["_syncbn_conventions"] = (key, value)
        return value

    def _fused(self, x: Tensor, mode: StatsMode) -> Activation | None:
        """The activation to fuse in place into this call (the old BatchNorm's hook)."""
        return None

    def _statistics_mode(self) -> StatsMode:
        return _semantics.statistics_mode(
            training=self.training, use_global_stats=self.use_global_stats,
            trainable_statistics=self.trainable_statistics,
        )

    def _synchronization(
        self, x: Tensor, mode: StatsMode
    ) -> tuple[_comm.ProcessGroup | None, _comm.CallSite | None, int]:
        """The group to take batch statistics over, its call site and the call counter's
        value; local layers: none."""
        return None, None, -1

    def _check_input(self, x: Tensor, shape: tuple[int, ...], channel_last: bool) -> None:
        layer = type(self).__name__
        if not x.is_floating_point():
            raise TypeError(
                f"{layer} expected a floating-point input (float16, bfloat16, float32 or "
                f"float64), got {x.dtype}. Fix: convert it with input.float()."
            )
        channels = x.size(1)
        if channels != self.num_features:
            where = "the last axis" if channel_last else "dim 1"
            other = "channels-first" if channel_last else "channel-last"
            raise ValueError(
                f"{layer} expected {self.num_features} channels at {where} "
                f"({self._layout.argument}={self.data_format!r}), got {channels} (input shape "
                f"{shape}). Fix: build the layer with {self._features_arg}={channels}, or "
                f"pass the {other} {self._layout.argument} if C sits elsewhere."
            )
        param_dtype = self._mean.dtype
        if x.dtype != param_dtype and not (x.dtype in _HALF and param_dtype == torch.float32):
            raise TypeError(
                f"{layer} has {param_dtype} parameters but got a {x.dtype} input. Fix: "
                f"convert the layer (layer.to({x.dtype})) or the input "
                f"(input.to({param_dtype}))."
            )

    def extra_repr(self) -> str:
        text = (f"num_features={self.num_features}, momentum={self.momentum}, "
                f"epsilon={self.epsilon}")
        if self.data_format != "NCHW":
            text += f", {self._layout.argument}={self.data_format}"
        if self.use_global_stats is not None:
            text += f", use_global_stats={self.use_global_stats}"
        if self.name is not None:
            text += f", name={self.name}"
        return text


class BatchNorm1D(_BatchNormBase):
    """As the N-d base, over 2-D or 3-D input: data_format 'NC', 'NCL' or 'NLC'."""

    _layout = LAYOUT_1D

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: object = None, bias_attr: object = None, data_format: str = "NCL",
                 use_global_stats: bool | None = None, name: str | None = None) -> None:
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
                         use_global_stats, name)


class BatchNorm2D(_BatchNormBase):
    """As the N-d base, over 4-D input: data_format 'NCHW' or 'NHWC'."""

    _layout = LAYOUT_2D

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: object = None, bias_attr: object = None, data_format: str = "NCHW",
                 use_global_stats: bool | None = None, name: str | None = None) -> None:
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
                         use_global_stats, name)


class BatchNorm3D(_BatchNormBase):
    """As the N-d base, over 5-D input: data_format 'NCDHW' or 'NDHWC'."""

    _layout = LAYOUT_3D

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: object = None, bias_attr: object = None,
                 data_format: str = "NCDHW", use_global_stats: bool | None = None,
                 name: str | None = None) -> None:
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
                         use_global_stats, name)


_CONVERTIBLE = (BatchNorm1D, BatchNorm2D, BatchNorm3D)
_RECONVERT = "SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)"
_STOCK = (*_CONVERTIBLE, *_BatchNormBase.__mro__)
"""What a converted layer behaves as: BatchNorm1D/2D/3D, their N-d base, nn.Module, object."""
_ALLOWED_OVERRIDES = ("__init__", "extra_repr", "__repr__", "__str__", "__init_subclass__",
                      "__subclasshook__")
"""What a subclass of ``BatchNorm1D/2D/3D`` may define and still be converted: it builds or
describes the layer (``__init__`` is run before converting; the converter copies the result).
Any other method, property or descriptor that replaces a stock one (``forward``, ``train``,
``eval``, ``_statistics_mode``, ``_check_input``, ``_load_from_state_dict``, …) is refused,
by the Torch flavour's rule (``syncbn.convert.overridden_methods``)."""
_STATE = ("weight", "bias", "_mean", "_variance")


class SyncBatchNorm(GroupPicklingMixin, _BatchNormBase):
    """As the N-d base, with the statistics of the whole batch over every rank of a group.

    In training, μ and σ² are taken over every value of the channel on every rank
    of ``process_group`` (default: the world), with any ``torch.distributed``
    backend, exactly for uneven and empty per-rank batches (one all-reduce of
    ``2C + 2`` values forward, one of ``2C + 2`` backward). Without an initialized
    process group, or with a group of one rank, it normalizes with the local batch,
    which is the same thing. In eval the running statistics normalize and nothing
    is communicated. Any rank 2–5 with any of 'NC', 'NCL', 'NCHW', 'NCDHW' (C at
    dim 1) or 'NLC', 'NHWC', 'NDHWC' (C last).

    As in Paddle, ``weight_attr=False`` / ``bias_attr=False`` create a frozen
    (``requires_grad=False``) parameter of ones / zeros rather than none.

    ``track_running_stats=False`` (from the API contract; Paddle 3 has no such
    argument) normalizes with the batch statistics in eval too (this rank's own
    batch, as ``torch.nn.SyncBatchNorm`` does) and never updates ``_mean`` and
    ``_variance``, which stay in the ``state_dict``.

    Keyword-only extensions (Paddle has none): ``process_group`` (a
    ``torch.distributed`` group; None: the world), ``timeout`` (seconds, 0.001 to
    1e7, one collective may take before a ``syncbn.SyncBatchNormError`` naming this
    layer; default ``SYNCBN_TIMEOUT``, else the group's own) and ``debug`` (compare a
    fingerprint of layer, channels, dtype, phase, eps and momentum across ranks
    first; default ``SYNCBN_DEBUG``). The two variables are read at every eager
    training forward, but under ``torch.compile`` when the layer is traced: changed
    after the first compiled step, they are ignored until ``torch._dynamo.reset()``
    (or a new ``torch.compile``) and a new trace.

    ``copy.deepcopy`` shares a custom ``process_group``; pickling (``torch.save``)
    drops it, and the unpickled layer's next synchronized forward says so until a
    group is set again (``syncbn._pickling``).
    """

    _layout = LAYOUT_SYNC
    _when_false = "frozen"

    track_running_stats: bool
    process_group: _comm.ProcessGroup | None
    timeout: float | None
    debug: bool | None
    _syncbn_name: str | None
    """The layer's path in the model, set by ``convert_sync_batchnorm``, for error messages."""
    _syncbn_calls: int
    """Synchronized forwards run so far on this rank, in eager mode (messages name it)."""

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: object = None, bias_attr: object = None, data_format: str = "NCHW",
                 track_running_stats: bool = True, name: str | None = None, *,
                 process_group: _comm.ProcessGroup | None = None, timeout: float | None = None,
                 debug: bool | None = None) -> None:
        if isinstance(track_running_stats, str):
            raise TypeError(
                f"SyncBatchNorm: expected track_running_stats to be True or False, got the str "
                f"{track_running_stats!r}. In this signature (the API contract) "
                "track_running_stats comes before name. Fix: pass name= by keyword."
            )
        _check_flag(track_running_stats, "SyncBatchNorm", "track_running_stats")
        _comm.check_group_arg(process_group)
        if timeout is not None and (  # `not <=`: NaN too
                isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not MIN_TIMEOUT_S <= timeout <= MAX_TIMEOUT_S):
            hint = timeout_hint(timeout) if isinstance(timeout, (int, float)) else ""
            raise ValueError(
                f"SyncBatchNorm: expected timeout to be a positive number of seconds "
                f"({MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}) or None (the group's own timeout), "
                f"got {timeout!r}{hint}. Fix: pass e.g. timeout=60."
            )
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
                         None, name)
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.timeout = None if timeout is None else float(timeout)
        self.debug = debug
        self._syncbn_name = None
        self._syncbn_calls = 0

    @property
    def layer_name(self) -> str:
        """How errors name this layer: ``name``, else its path (set by convert), else a repr."""
        return self.name or self._syncbn_name or f"SyncBatchNorm({self.num_features})"

    def _statistics_mode(self) -> StatsMode:
        return _semantics.statistics_mode(training=self.training, use_global_stats=None,
                                          track_running_stats=self.track_running_stats)

    def _synchronization(
        self, x: Tensor, mode: StatsMode
    ) -> tuple[_comm.ProcessGroup | None, _comm.CallSite | None, int]:
        if not (self.training and mode.batch_stats):
            return None, None, -1  # eval never communicates
        if not torch.compiler.is_compiling():
            check_group_travelled(self, self.layer_name, _RECONVERT)
        group = _comm.resolve_group(self.process_group, who=_comm.layer_label(self.layer_name))
        if local_fallback_applies(group):
            return None, None, -1
        conventions = self._conventions("SyncBatchNorm")
        site = call_site(x, self.layer_name, self.timeout, self.debug, eps=conventions.eps,
                         decay=conventions.decay)
        call = -1
        if not torch.compiler.is_compiling():  # a Python counter would recompile every call
            call = self._syncbn_calls
            if not is_recomputing():
                self._syncbn_calls += 1
        return group, site, call

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if not self.track_running_stats:
            text += ", track_running_stats=False"
        if self.process_group is not None:
            text += ", process_group=<custom>"
        return text

    @classmethod
    def convert_sync_batchnorm(
        cls, layer: nn.Module, *, process_group: _comm.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every ``BatchNorm1D/2D/3D`` in ``layer``'s tree by a ``SyncBatchNorm``.

        Each new layer keeps ``momentum``, ``epsilon``, ``data_format``, ``name`` and the
        train/eval mode, and shares the very ``weight``, ``bias``, ``_mean`` and
        ``_variance`` tensors (and their ParamAttr records), so an optimizer built
        before keeps working. The converted model has exactly the original's
        ``state_dict`` keys: an absent weight or bias (``weight_attr=False``) stays
        absent (scale 1 / shift 0, the same computation; a hand-built
        ``SyncBatchNorm(weight_attr=False)`` has Paddle's frozen parameter instead),
        so a ``.pdparams`` file loads before or after converting. As in Paddle,
        ``use_global_stats`` is not carried over (SyncBatchNorm follows train/eval).
        ``SyncBatchNorm`` layers stay as they are (and take ``process_group`` when
        one is given); the old-style ``BatchNorm`` is not converted, as in Paddle.
        Subclasses of ``BatchNorm1D/2D/3D`` are converted when they behave as their
        base: no method, property or descriptor of their own that replaces one of the
        base's (``forward``, ``train``, ``eval``, the statistics hooks, …) other than
        ``__init__``, ``extra_repr``, ``__repr__`` and ``__str__``; refused otherwise
        (``_ALLOWED_OVERRIDES``).
        Unlike Paddle, nothing of the caller's layers is renamed or otherwise changed.

        Returns:
            ``layer`` with the layers replaced in place, or the new layer when
            ``layer`` itself is a ``BatchNorm1D/2D/3D``.

        Raises:
            TypeError: ``layer`` is not an ``nn.Module``, or ``process_group`` not a group.
            ValueError: a subclass of ``BatchNorm1D/2D/3D`` overrides how it behaves
                (a SyncBatchNorm would silently compute something else), on the class or
                the instance; nothing was changed then.
        """
        if not isinstance(layer, nn.Module):
            raise TypeError(
                f"SyncBatchNorm.convert_sync_batchnorm expected an nn.Module, got "
                f"{type(layer).__name__}. Fix: pass the model (or layer) to convert."
            )
        _comm.check_group_arg(process_group)
        new = {id(module): cls._from_batchnorm(module, process_group, path)
               for path, module in layer.named_modules() if cls._converts(module, path)}
        return replace_in_tree(layer, lambda module, path: cls._convert_one(
            module, process_group, path, new))

    @classmethod
    def _converts(cls, layer: nn.Module, path: str) -> bool:
        """Whether ``layer`` is one to convert; raises for a subclass that computes otherwise."""
        if isinstance(layer, SyncBatchNorm) or not isinstance(layer, _CONVERTIBLE):
            return False
        overridden = overridden_methods(type(layer), _STOCK, _ALLOWED_OVERRIDES, _STATE)
        replaced = replaced_on_instance(layer, _STOCK)
        if overridden:
            problem = f"the class overrides {', '.join(overridden)}"
        elif replaced:
            problem = (f"the layer's {', '.join(replaced)} {'is' if len(replaced) == 1 else 'are'} "
                       "replaced on the instance")
        else:
            return True
        raise ValueError(
            f"SyncBatchNorm.convert_sync_batchnorm cannot convert '{path or '<root>'}' "
            f"({type(layer).__module__}.{type(layer).__qualname__}): {problem}, which a "
            "SyncBatchNorm would not run, so the model would silently compute something "
            "else (a subclass converts when it changes at most __init__, extra_repr, "
            "__repr__ and __str__). Fix: replace that layer by a SyncBatchNorm (or your own "
            "synchronized subclass) yourself. Nothing was converted."
        )

    @classmethod
    def _convert_one(cls, layer: nn.Module, process_group: _comm.ProcessGroup | None,
                     path: str, new: dict[int, SyncBatchNorm]) -> nn.Module:
        if isinstance(layer, SyncBatchNorm):
            if process_group is not None:
                layer.process_group = process_group
            layer._syncbn_name = layer._syncbn_name or path or None
            return layer
        return new.get(id(layer), layer)

    @classmethod
    def _from_batchnorm(cls, source: nn.Module, process_group: _comm.ProcessGroup | None,
                        path: str) -> SyncBatchNorm:
        assert isinstance(source, _BatchNormBase)
        layer = cls(
            source.num_features, source.momentum, source.epsilon,
            weight_attr=False if source.weight is None else None,
            bias_attr=False if source.bias is None else None,
            data_format=source.data_format, name=source.name, process_group=process_group,
        )
        # the very tensors, and an absent weight or bias stays absent (no frozen fill: the
        # same scale 1 / shift 0, and the original's state_dict keys)
        layer.weight = source.weight
        layer.bias = source.bias
        layer._mean = source._mean
        layer._variance = source._variance
        records: dict[str, object] = layer.__dict__.get(PARAM_ATTRS_ATTRIBUTE) or {}
        for name in [n for n in records if layer._parameters.get(n) is None]:
            del records[name]  # the dropped frozen fill's
        copy_param_attrs(source, layer)
        layer.train(source.training)
        layer._syncbn_name = path or None
        return layer


class BatchNorm(_BatchNormBase):
    """Paddle's old-style ``paddle.nn.BatchNorm``: any rank 2–5, an activation, test flags.

    The N-d base with C at dim 1 (``data_layout='NCHW'``) or last (``'NHWC'``; in any
    letter case, ``'nhwc'`` too, as Paddle's operator upper-cases it) for
    any input rank 2–5, ``act`` applied to the normalized output in training and
    eval, parameters of ``dtype``, and the statistics chosen as Paddle's operator
    does (``_semantics.statistics_mode``):

    ===============================  ========================  =============
    setting                          normalizes with           updates stats
    ===============================  ========================  =============
    default, ``.train()``            batch statistics          yes
    default, ``.eval()``             running statistics        no
    ``is_test=True``                 running (starts in eval)  no
    ``use_global_stats=True``        running, train or eval    no
    ``trainable_statistics=True``    batch, in eval too        yes
    ===============================  ========================  =============

    ``is_test=True`` only sets the initial mode: ``.train()`` undoes it.

    ``param_attr`` is the weight's attr (``False``: no weight, scale 1). The scale
    starts at 1 (Paddle's code; its docstring's "Xavier" is not what it does).
    ``in_place``, ``moving_mean_name``, ``moving_variance_name`` and
    ``do_model_average_for_mean_and_var`` are accepted and kept, with no numerical
    effect.

    Raises:
        ValueError: ``act`` is not a known activation (the message lists them), or
            ``data_layout``/``dtype`` is not accepted.
    """

    _layout = LAYOUT_BATCHNORM
    _features_arg = "num_channels"
    _weight_arg = "param_attr"

    act: str | None
    in_place: bool
    _fused_last: bool
    moving_mean_name: str | None
    moving_variance_name: str | None
    do_model_average_for_mean_and_var: bool

    def __init__(
        self,
        num_channels: int,
        act: str | None = None,
        is_test: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-05,
        param_attr: object = None,
        bias_attr: object = None,
        dtype: str | torch.dtype = "float32",
        data_layout: str = "NCHW",
        in_place: bool = False,
        moving_mean_name: str | None = None,
        moving_variance_name: str | None = None,
        do_model_average_for_mean_and_var: bool = True,
        use_global_stats: bool = False,
        trainable_statistics: bool = False,
    ) -> None:
        get_activation(act)  # raises for an unknown name, listing the accepted ones
        for flag, value in (("is_test", is_test), ("use_global_stats", use_global_stats),
                            ("trainable_statistics", trainable_statistics)):
            _check_flag(value, "BatchNorm", flag)
        super().__init__(
            num_channels, momentum, epsilon, param_attr, bias_attr, data_layout,
            use_global_stats, None, trainable_statistics=trainable_statistics,
            dtype=_semantics.parameter_dtype(dtype, "BatchNorm"),
        )
        self.act = act
        self.in_place = in_place
        self.moving_mean_name = moving_mean_name
        self.moving_variance_name = moving_variance_name
        self.do_model_average_for_mean_and_var = do_model_average_for_mean_and_var
        self.train(not is_test)

    @property
    def data_layout(self) -> str:
        """Paddle's name for this layer's ``data_format``."""
        return self.data_format

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` as the table in the class docstring says, then apply ``act``.

        With ``in_place=True``, batch statistics and an ``act`` the core can invert
        (None, 'leaky_relu'), the activation is fused into the core's
        in-place activated mode: the input is overwritten and only the output is
        saved for backward. Where that mode cannot run (another ``act``, an input
        autograd still needs, a zero scale), the same result is computed out of
        place: ``in_place`` never changes the numbers.
        """
        self._fused_last = False
        y = super().forward(input)
        return y if self._fused_last else get_activation(self.act)(y)

    def _fused(self, x: Tensor, mode: StatsMode) -> Activation | None:
        activation = _semantics.fused_activation(self.act) if self.in_place else None
        if activation is None or not mode.batch_stats:
            return None
        if inplace_blocker(x, activation) is not None or not inplace_weight_ok(
                x, self.weight, self.bias):
            return None
        self._fused_last = True
        return activation

    def extra_repr(self) -> str:
        text = (f"num_channels={self.num_features}, momentum={self.momentum}, "
                f"epsilon={self.epsilon}")
        if self.data_format != "NCHW":
            text += f", data_layout={self.data_format}"
        for flag in ("use_global_stats", "trainable_statistics"):
            if getattr(self, flag):
                text += f", {flag}=True"
        if self.act is not None:
            text += f", act={self.act}"
        return text
