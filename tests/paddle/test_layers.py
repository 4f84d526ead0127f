"""The Paddle-flavour layers on one process: numerics, modes, formats, attrs, errors, convert."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from paddle_oracle import reference
from torch import Tensor, nn

from syncbn.paddle_compat import (
    BatchNorm,
    BatchNorm1D,
    BatchNorm2D,
    BatchNorm3D,
    Constant,
    L2Decay,
    ParamAttr,
    SyncBatchNorm,
    get_activation,
    get_param_attr,
    optimizer_param_groups,
)
from syncbn.paddle_compat._layers import _BatchNormBase

F64 = {"rtol": 1e-12, "atol": 1e-12}
Factory = Callable[[], _BatchNormBase]


def _data(shape: tuple[int, ...], seed: int = 0, channel_dim: int = 1) -> Tensor:
    """float64 data with a different offset and scale per channel."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[channel_dim]
    view = [1] * len(shape)
    view[channel_dim] = c
    scale = torch.rand(c, generator=gen, dtype=torch.float64).view(view) * 2 + 0.5
    offset = torch.randn(c, generator=gen, dtype=torch.float64).view(view) * 3
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset


def _init(layer: _BatchNormBase, seed: int = 1) -> _BatchNormBase:
    """float64, and non-default parameters and statistics, so that each one matters."""
    layer.double()
    gen = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        layer._mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        layer._variance.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    return layer


def _channel_last(layer: _BatchNormBase) -> bool:
    return layer._layout.channel_last(layer.data_format)


def _check_step(layer: _BatchNormBase, x: Tensor, *, batch_stats: bool, update: bool,
                seed: int = 2) -> Tensor:
    """One forward/backward of ``layer`` against the oracle (float64, 1e-12); returns y."""
    last = _channel_last(layer)
    mean0, var0 = layer._mean.clone(), layer._variance.clone()
    x = x.detach().clone().requires_grad_()
    leaves = {name: getattr(layer, name).detach().clone().requires_grad_()
              if getattr(layer, name) is not None else None for name in ("weight", "bias")}
    x_ref = (x.detach().movedim(-1, 1) if last else x.detach()).clone().requires_grad_()
    y = layer(x)
    y_ref, mean_ref, var_ref = reference(
        x_ref, leaves["weight"], leaves["bias"], mean0, var0, momentum=layer.momentum,
        epsilon=layer.epsilon, batch_stats=batch_stats)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(dy)
    y_ref.backward(dy.movedim(-1, 1) if last else dy)
    back = (lambda t: t.movedim(1, -1)) if last else (lambda t: t)
    torch.testing.assert_close(y, back(y_ref), **F64)
    torch.testing.assert_close(x.grad, back(x_ref.grad), **F64)
    for name, leaf in leaves.items():
        param = getattr(layer, name)
        if leaf is not None and param.requires_grad:
            torch.testing.assert_close(param.grad, leaf.grad, **F64)
            param.grad = None
    if update:
        torch.testing.assert_close(layer._mean, mean_ref, **F64)
        torch.testing.assert_close(layer._variance, var_ref, **F64)
    else:
        assert torch.equal(layer._mean, mean0) and torch.equal(layer._variance, var0)
    return y


# --- the seed example and Paddle's numerics --------------------------------------------------


def test_seed_example_from_paddle_docs() -> None:
    x = torch.tensor([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]])
    y = SyncBatchNorm(2)(x)
    expected = torch.tensor([[[[0.26824948, 1.09363246], [0.26824948, -1.63013160]],
                              [[0.80956620, -0.66528702], [-1.27446556, 1.13018656]]]])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


TRAINING = {
    "1d-NC": (lambda: BatchNorm1D(3, data_format="NC"), (7, 3)),
    "1d-NCL": (lambda: BatchNorm1D(3), (4, 3, 5)),
    "1d-NLC": (lambda: BatchNorm1D(3, data_format="NLC"), (4, 5, 3)),
    "2d-NCHW": (lambda: BatchNorm2D(3, momentum=0.8), (2, 3, 4, 5)),
    "2d-NHWC": (lambda: BatchNorm2D(3, data_format="NHWC", epsilon=1e-3), (2, 4, 5, 3)),
    "3d-NCDHW": (lambda: BatchNorm3D(3), (2, 3, 2, 3, 4)),
    "3d-NDHWC": (lambda: BatchNorm3D(3, data_format="NDHWC"), (2, 2, 3, 4, 3)),
    "sync-NCHW": (lambda: SyncBatchNorm(3), (2, 3, 4, 5)),
    "sync-NLC": (lambda: SyncBatchNorm(3, data_format="NLC"), (3, 4, 3)),
    "old-NCHW-2d": (lambda: BatchNorm(3, momentum=0.7), (9, 3)),
    "old-NHWC-5d": (lambda: BatchNorm(3, data_layout="NHWC"), (2, 2, 3, 2, 3)),
}


@pytest.mark.parametrize(("make", "shape"), TRAINING.values(), ids=TRAINING.keys())
def test_training_float64_matches_paddle_formula(make: Factory, shape: tuple[int, ...]) -> None:
    """Batch mean and biased variance; _mean/_variance ← m·old + (1 − m)·batch, 3 steps."""
    layer = _init(make())
    unrounded_var = layer._variance.clone()
    for step in range(3):
        x = _data(shape, seed=10 + step, channel_dim=-1 if _channel_last(layer) else 1)
        x_cf = x.movedim(-1, 1) if _channel_last(layer) else x
        _, _, unrounded_var = reference(x_cf, None, None, layer._mean, unrounded_var,
                                        momentum=layer.momentum, rounded=False)
        _check_step(layer, x, batch_stats=True, update=True, seed=step)
    # the float32 momentum matters at this tolerance: 0.9 unrounded is off by far more
    assert (layer._variance - unrounded_var).abs().max() > 1e-9


def test_running_variance_is_biased() -> None:
    layer = BatchNorm1D(1, momentum=0.0).double()
    layer(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    assert layer._mean.item() == 2.0
    assert layer._variance.item() == 1.0  # biased: ((1-2)² + (3-2)²)/2, torch would give 2


# --- which statistics: every row of the tables ----------------------------------------

MODES: dict[str, tuple[Factory, bool | None, bool, bool]] = {
    # factory, train(True)/eval(False)/as constructed(None), batch statistics?, update?
    "old-default-train": (lambda: BatchNorm(3), True, True, True),
    "old-default-eval": (lambda: BatchNorm(3), False, False, False),
    "old-is_test": (lambda: BatchNorm(3, is_test=True), None, False, False),
    "old-use_global_stats-train": (lambda: BatchNorm(3, use_global_stats=True), True, False,
                                   False),
    "old-use_global_stats-eval": (lambda: BatchNorm(3, use_global_stats=True), False, False,
                                  False),
    "old-trainable_statistics-eval": (lambda: BatchNorm(3, trainable_statistics=True), False,
                                      True, True),
    "nd-none-train": (lambda: BatchNorm2D(3), True, True, True),
    "nd-none-eval": (lambda: BatchNorm2D(3), False, False, False),
    "nd-true-train": (lambda: BatchNorm2D(3, use_global_stats=True), True, False, False),
    "nd-true-eval": (lambda: BatchNorm2D(3, use_global_stats=True), False, False, False),
    "nd-false-train": (lambda: BatchNorm2D(3, use_global_stats=False), True, True, True),
    "nd-false-eval": (lambda: BatchNorm2D(3, use_global_stats=False), False, True, True),
    "sync-train": (lambda: SyncBatchNorm(3), True, True, True),
    "sync-eval": (lambda: SyncBatchNorm(3), False, False, False),
    "sync-untracked-train": (lambda: SyncBatchNorm(3, track_running_stats=False), True, True,
                             False),
    "sync-untracked-eval": (lambda: SyncBatchNorm(3, track_running_stats=False), False, True,
                            False),
}


@pytest.mark.parametrize(("make", "train", "batch_stats", "update"), MODES.values(),
                         ids=MODES.keys())
def test_modes_statistics_update_and_gradients(make: Factory, train: bool | None,
                                               batch_stats: bool, update: bool) -> None:
    """Output, running stats and all gradients against the oracle. In the running rows the
    gradients are those of the affine map with fixed statistics; in eval with batch
    statistics they are the exact gradients through μ and σ² (not Paddle's mix)."""
    layer = _init(make())
    if train is not None:
        layer.train(train)
    _check_step(layer, _data((4, 3, 2, 5)), batch_stats=batch_stats, update=update)


def test_is_test_starts_in_eval_and_train_undoes_it() -> None:
    layer = _init(BatchNorm(3, is_test=True))
    assert layer.training is False
    _check_step(layer, _data((4, 3)), batch_stats=False, update=False)
    layer.train()
    _check_step(layer, _data((4, 3)), batch_stats=True, update=True)


def test_trainable_statistics_gradient_is_not_the_affine_one() -> None:
    """The eval/trainable-statistics gradient flows through μ and σ² (Paddle's does not)."""
    x = _data((6, 2)).requires_grad_()
    layer = _init(BatchNorm(2, trainable_statistics=True)).eval()
    layer(x).square().sum().backward()
    affine = _init(BatchNorm(2, use_global_stats=True))
    affine._mean.copy_(x.detach().mean(0))
    affine._variance.copy_(x.detach().var(0, unbiased=False))
    x2 = x.detach().clone().requires_grad_()
    affine(x2).square().sum().backward()
    assert x.grad is not None and x2.grad is not None
    assert (x.grad - x2.grad).abs().max() > 1e-3


# --- act, and the old layer's other arguments ---------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid", "hard_swish"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_act_applied_to_normalized_output(act: str, train: bool) -> None:
    with_act = _init(BatchNorm(3, act=act)).train(train)
    plain = _init(BatchNorm(3)).train(train)
    x = _data((5, 3, 4))
    torch.testing.assert_close(with_act(x), get_activation(act)(plain(x)), rtol=0, atol=0)
    assert torch.equal(with_act._mean, plain._mean)


def test_unknown_act_lists_the_accepted_names() -> None:
    with pytest.raises(ValueError, match=r"act: unknown activation 'relu7'\. Did you mean "
                                         r".*'relu6'.*Fix: pass None or one of .*hard_swish.*relu"):
        BatchNorm(3, act="relu7")
    with pytest.raises(TypeError, match=r"act: expected None or an activation name"):
        BatchNorm(3, act=torch.relu)  # type: ignore[arg-type]


def test_arguments_without_numerical_effect() -> None:
    kwargs: dict[str, Any] = {"in_place": True, "moving_mean_name": "bn_mean",
                              "moving_variance_name": "bn_var",
                              "do_model_average_for_mean_and_var": False}
    layer = _init(BatchNorm(3, **kwargs))
    plain = _init(BatchNorm(3))
    x = _data((4, 3, 3))
    # in_place=True may overwrite its input (as Paddle's): give it a copy
    assert torch.equal(layer(x.clone()), plain(x))
    assert torch.equal(layer._variance, plain._variance)
    assert all(getattr(layer, k) == v for k, v in kwargs.items())
    assert list(layer.state_dict()) == ["weight", "bias", "_mean", "_variance"]


@pytest.mark.parametrize("shape", [(4, 3), (4, 5, 3), (2, 4, 5, 3), (2, 2, 3, 4, 3)],
                         ids=["2d", "3d", "4d", "5d"])
def test_old_batchnorm_nhwc_on_any_rank(shape: tuple[int, ...]) -> None:
    nhwc = _init(BatchNorm(3, data_layout="NHWC"))
    nchw = _init(BatchNorm(3))
    x = _data(shape, channel_dim=-1)
    y = nhwc(x)
    assert y.shape == x.shape and nhwc.data_layout == "NHWC"
    torch.testing.assert_close(y, nchw(x.movedim(-1, 1)).movedim(1, -1), **F64)
    torch.testing.assert_close(nhwc._variance, nchw._variance, **F64)


@pytest.mark.parametrize("layout", ["nhwc", "Nhwc", "nchw"])
def test_old_batchnorm_data_layout_in_any_case(layout: str) -> None:
    # real Paddle: BatchNorm(3, data_layout='nhwc') trains on a (4, 5, 5, 3) input
    layer = _init(BatchNorm(3, data_layout=layout))
    upper = _init(BatchNorm(3, data_layout=layout.upper()))
    x = _data((4, 5, 5, 3) if layout.upper() == "NHWC" else (4, 3, 5, 5),
              channel_dim=-1 if layout.upper() == "NHWC" else 1)
    torch.testing.assert_close(layer(x), upper(x), rtol=0, atol=0)
    torch.testing.assert_close(layer._variance, upper._variance, rtol=0, atol=0)
    assert layer.data_layout == layout  # kept as given, as Paddle does


@pytest.mark.parametrize(
    "make",
    [lambda: BatchNorm1D(3, data_format="nlc"), lambda: BatchNorm2D(3, data_format="nhwc"),
     lambda: BatchNorm3D(3, data_format="ndhwc"), lambda: SyncBatchNorm(3, data_format="nchw")],
    ids=["1d", "2d", "3d", "sync"],
)
def test_new_layers_data_format_is_case_sensitive(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"Did you mean '(NLC|NHWC|NDHWC|NCHW)'\?"):
        make()


def test_old_batchnorm_dtype_is_the_parameter_dtype() -> None:
    assert BatchNorm(3).weight.dtype == torch.float32
    layer = BatchNorm(3, dtype="float64")
    assert {t.dtype for t in layer.state_dict().values()} == {torch.float64}
    assert BatchNorm(3, dtype="float16")._mean.dtype == torch.float32  # as Paddle
    assert BatchNorm2D(3).weight.dtype == torch.get_default_dtype()


# --- parameters, attrs, state -----------------------------------------------------------------

ALL = {
    "BatchNorm1D": lambda **kw: BatchNorm1D(4, **kw),
    "BatchNorm2D": lambda **kw: BatchNorm2D(4, **kw),
    "BatchNorm3D": lambda **kw: BatchNorm3D(4, **kw),
    "SyncBatchNorm": lambda **kw: SyncBatchNorm(4, **kw),
    "BatchNorm": lambda **kw: BatchNorm(4, **{("param_attr" if k == "weight_attr" else k): v
                                              for k, v in kw.items()}),
}


@pytest.mark.parametrize("make", ALL.values(), ids=ALL.keys())
def test_state_dict_names_order_and_initial_values(make: Callable[..., _BatchNormBase]) -> None:
    layer = make()
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "_mean", "_variance"]
    expected = {"weight": 1.0, "bias": 0.0, "_mean": 0.0, "_variance": 1.0}
    for name, value in expected.items():
        assert torch.equal(state[name], torch.full((4,), value)), name
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in layer.named_buffers()] == ["_mean", "_variance"]
    assert not hasattr(layer, "num_batches_tracked")


LOCAL = {k: v for k, v in ALL.items() if k != "SyncBatchNorm"}


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("make", LOCAL.values(), ids=LOCAL.keys())
def test_attr_false_means_no_parameter(make: Callable[..., _BatchNormBase], which: str) -> None:
    layer = _init(make(**{f"{which}_attr": False}))
    assert getattr(layer, which) is None
    assert which not in layer.state_dict()
    full = _init(make())
    with torch.no_grad():
        getattr(full, which).fill_(1.0 if which == "weight" else 0.0)  # acts as 1 / 0
        other = "bias" if which == "weight" else "weight"
        getattr(full, other).copy_(getattr(layer, other))
    x = _data((4, 4, 3, 3)) if isinstance(layer, BatchNorm2D) else _data(
        (4, 4, 3, 3, 2) if isinstance(layer, BatchNorm3D) else (4, 4, 3))
    torch.testing.assert_close(layer(x), full(x), **F64)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_sync_attr_false_is_a_frozen_parameter(which: str) -> None:
    layer = SyncBatchNorm(4, **{f"{which}_attr": False})  # type: ignore[arg-type]
    param = getattr(layer, which)
    assert isinstance(param, nn.Parameter) and param.requires_grad is False
    assert torch.equal(param.detach(), torch.full((4,), 1.0 if which == "weight" else 0.0))
    assert which in layer.state_dict()
    assert get_param_attr(layer, which) == ParamAttr(
        initializer=Constant(1.0 if which == "weight" else 0.0), trainable=False)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda: BatchNorm2D(3, weight_attr=False), _data((4, 3, 2, 2))),
        (lambda: BatchNorm2D(3, bias_attr=False), _data((4, 3, 2, 2))),
        (lambda: BatchNorm(3, param_attr=False), _data((5, 3))),
        (lambda: SyncBatchNorm(3, weight_attr=False), _data((5, 3))),
        (lambda: SyncBatchNorm(3, bias_attr=False), _data((5, 3))),
        (lambda: BatchNorm1D(3, weight_attr=ParamAttr(trainable=False)), _data((5, 3))),
    ],
    ids=["2d-no-weight", "2d-no-bias", "old-no-weight", "sync-frozen-weight", "sync-frozen-bias",
         "1d-untrainable-weight"],
)
def test_other_parameter_still_gets_its_gradient(make: Factory, x: Tensor) -> None:
    """Paddle returns no gradient for the other parameter here; we return the exact one."""
    layer = _init(make())
    _check_step(layer, x, batch_stats=True, update=True)


def test_param_attr_initializer_trainable_learning_rate_regularizer() -> None:
    attr = ParamAttr(initializer=Constant(2.0), learning_rate=0.5, regularizer=L2Decay(0.01))
    layer = BatchNorm2D(3, weight_attr=attr, bias_attr=ParamAttr(trainable=False))
    assert torch.equal(layer.weight.detach(), torch.full((3,), 2.0))
    assert layer.bias is not None and layer.bias.requires_grad is False
    assert get_param_attr(layer, "weight") == attr
    groups = optimizer_param_groups(layer, base_lr=0.1, weight_decay=0.0)
    assert [(g["lr"], g["weight_decay"], g["params"]) for g in groups] == [
        (pytest.approx(0.05), 0.01, [layer.weight])]
    old = BatchNorm(3, param_attr=Constant(3.0), bias_attr=L2Decay(0.2))
    assert torch.equal(old.weight.detach(), torch.full((3,), 3.0))
    assert get_param_attr(old, "bias") == ParamAttr(regularizer=L2Decay(0.2))


def test_a_paddle_state_dict_loads() -> None:
    paddle_state = {"weight": torch.rand(3), "bias": torch.rand(3), "_mean": torch.rand(3),
                    "_variance": torch.rand(3) + 1}
    for layer in (BatchNorm2D(3), SyncBatchNorm(3), BatchNorm(3)):
        layer.load_state_dict(paddle_state, strict=True)
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in paddle_state.items())


def test_deepcopy_keeps_state_and_attrs() -> None:
    layer = BatchNorm(3, act="relu", param_attr=ParamAttr(learning_rate=0.5))
    clone = copy.deepcopy(layer)
    assert clone.act == "relu" and get_param_attr(clone, "weight") == ParamAttr(learning_rate=0.5)


def test_repr() -> None:
    assert repr(SyncBatchNorm(5)) == "SyncBatchNorm(num_features=5, momentum=0.9, epsilon=1e-05)"
    assert repr(BatchNorm2D(4, data_format="NHWC", use_global_stats=True, name="bn")) == (
        "BatchNorm2D(num_features=4, momentum=0.9, epsilon=1e-05, data_format=NHWC, "
        "use_global_stats=True, name=bn)")
    assert repr(BatchNorm(5, act="relu", trainable_statistics=True)) == (
        "BatchNorm(num_channels=5, momentum=0.9, epsilon=1e-05, trainable_statistics=True, "
        "act=relu)")


# --- layouts: channel-last in, channel-last out -----------------------------------------------

LAYOUTS = {
    "1d-NLC": (lambda f: BatchNorm1D(3, data_format=f), "NLC", "NCL", (4, 5, 3)),
    "1d-NLC-2d-input": (lambda f: BatchNorm1D(3, data_format=f), "NLC", "NC", (6, 3)),
    "2d-NHWC": (lambda f: BatchNorm2D(3, data_format=f), "NHWC", "NCHW", (2, 4, 5, 3)),
    "3d-NDHWC": (lambda f: BatchNorm3D(3, data_format=f), "NDHWC", "NCDHW", (2, 2, 3, 4, 3)),
    "sync-NHWC": (lambda f: SyncBatchNorm(3, data_format=f), "NHWC", "NCHW", (2, 4, 5, 3)),
    "sync-NDHWC": (lambda f: SyncBatchNorm(3, data_format=f), "NDHWC", "NCDHW", (2, 2, 3, 4, 3)),
}


@pytest.mark.parametrize(("make", "last", "first", "shape"), LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_channel_last_in_and_out(make: Callable[[str], _BatchNormBase], last: str, first: str,
                                 shape: tuple[int, ...], train: bool) -> None:
    layer_last, layer_first = _init(make(last)).train(train), _init(make(first)).train(train)
    x = _data(shape, channel_dim=-1).requires_grad_()
    y = layer_last(x)
    assert y.shape == x.shape and y.is_contiguous()  # channel-last, dense
    x_first = x.detach().movedim(-1, 1).contiguous().requires_grad_()
    y_first = layer_first(x_first)
    torch.testing.assert_close(y, y_first.movedim(1, -1), **F64)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_first.backward(dy.movedim(-1, 1))
    assert x.grad is not None and x_first.grad is not None and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad, x_first.grad.movedim(1, -1), **F64)
    torch.testing.assert_close(layer_last._variance, layer_first._variance, **F64)


def test_paddle_aliases_for_1d_and_3d_formats() -> None:
    x = _data((4, 5, 3), channel_dim=-1)
    torch.testing.assert_close(BatchNorm1D(3, data_format="NHWC").double()(x),
                               BatchNorm1D(3, data_format="NLC").double()(x), **F64)
    x5 = _data((2, 3, 2, 2, 2))
    torch.testing.assert_close(BatchNorm3D(3, data_format="NCHW").double()(x5),
                               BatchNorm3D(3).double()(x5), **F64)


# --- edge inputs ------------------------------------------------------------------------------

SINGLE = {
    "2d": (lambda: BatchNorm2D(3), (1, 3, 1, 1)),
    "2d-NHWC": (lambda: BatchNorm2D(3, data_format="NHWC"), (1, 1, 1, 3)),
    "1d-NC": (lambda: BatchNorm1D(3, data_format="NC"), (1, 3)),
    "3d": (lambda: BatchNorm3D(3), (1, 3, 1, 1, 1)),
    "sync": (lambda: SyncBatchNorm(3), (1, 3)),
    "old": (lambda: BatchNorm(3), (1, 3, 1)),
    "nd-false-eval": (lambda: BatchNorm2D(3, use_global_stats=False).eval(), (1, 3, 1, 1)),
}


@pytest.mark.parametrize(("make", "shape"), SINGLE.values(), ids=SINGLE.keys())
def test_one_value_per_channel_returns_the_input(make: Factory, shape: tuple[int, ...]) -> None:
    layer = _init(make())
    mean0, var0 = layer._mean.clone(), layer._variance.clone()
    x = _data(shape, channel_dim=-1 if _channel_last(layer) else 1).requires_grad_()
    y = layer(x)
    assert torch.equal(y, x)
    assert torch.equal(layer._mean, mean0) and torch.equal(layer._variance, var0)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(("make", "shape"), [
    (lambda: BatchNorm2D(3), (0, 3, 4, 4)),
    (lambda: BatchNorm2D(3, data_format="NHWC"), (0, 4, 4, 3)),
    (lambda: BatchNorm1D(3), (0, 3)),
    (lambda: SyncBatchNorm(3, data_format="NLC"), (0, 5, 3)),
    (lambda: BatchNorm(3, trainable_statistics=True).eval(), (0, 3, 2)),
], ids=["2d", "2d-NHWC", "1d", "sync-NLC", "old-trainable-eval"])
@pytest.mark.parametrize("train", [True, False, None], ids=["train", "eval", "as-built"])
def test_empty_batch_gives_empty_output_and_unchanged_stats(
        make: Factory, shape: tuple[int, ...], train: bool | None) -> None:
    layer = _init(make())
    if train is not None:
        layer.train(train)
    mean0, var0 = layer._mean.clone(), layer._variance.clone()
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == shape and x.grad is not None and x.grad.shape == shape
    assert torch.equal(layer._mean, mean0) and torch.equal(layer._variance, var0)
    assert not layer._mean.isnan().any() and not layer._variance.isnan().any()


def test_gradcheck_training_channel_last() -> None:
    layer = _init(BatchNorm1D(2, data_format="NLC"))
    x = _data((3, 4, 2), channel_dim=-1).requires_grad_()

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))
        return out

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_checkpoint_recompute_updates_running_stats_once() -> None:
    layer = _init(BatchNorm2D(3))
    twin = _init(BatchNorm2D(3))
    x = _data((4, 3, 2, 2)).requires_grad_()
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()
    twin(x.detach())
    assert torch.equal(layer._mean, twin._mean) and torch.equal(layer._variance, twin._variance)


def test_half_input_on_float32_layer() -> None:
    layer = BatchNorm2D(3)
    x = torch.randn(4, 3, 2, 2)
    for train in (True, False):
        y = layer.train(train)(x.half())
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


# --- errors: every message --------------------------------------------------------------------

CONSTRUCTION_ERRORS = {
    "num_features-zero": (lambda: BatchNorm2D(0), ValueError,
                          r"BatchNorm2D: expected num_features > 0 \(the number of channels C\), "
                          r"got 0\. Fix"),
    "num_features-float": (lambda: BatchNorm1D(2.0), TypeError,  # type: ignore[arg-type]
                           r"BatchNorm1D: expected num_features to be an int .*got float"),
    "num_channels-bool": (lambda: BatchNorm(True), TypeError,
                          r"BatchNorm: expected num_channels to be an int"),
    "momentum": (lambda: SyncBatchNorm(3, momentum=1.1), ValueError,
                 r"SyncBatchNorm: expected momentum in \[0, 1\], got 1\.1"),
    "epsilon": (lambda: BatchNorm3D(3, epsilon=-1e-5), ValueError,
                r"BatchNorm3D: expected a finite epsilon >= 0"),
    "data_format-2d": (lambda: BatchNorm2D(3, data_format="NCL"), ValueError,
                       r"BatchNorm2D: expected NCHW or NHWC for data_format, got 'NCL'\..*Fix"),
    "data_format-1d": (lambda: BatchNorm1D(3, data_format="NCHW_"), ValueError,
                       r"BatchNorm1D: expected NC, NCL or NLC for data_format"),
    "data_format-3d": (lambda: BatchNorm3D(3, data_format="ndhwc"), ValueError,
                       r"BatchNorm3D: expected NCDHW or NDHWC .*Did you mean 'NDHWC'\?"),
    "data_format-sync": (lambda: SyncBatchNorm(3, data_format="HWC"), ValueError,
                         r"SyncBatchNorm: expected NCDHW, NDHWC, NCL, NLC, NC, NCHW or NHWC for "
                         r"data_format, got 'HWC'"),
    "data_layout": (lambda: BatchNorm(3, data_layout="NDHWC"), ValueError,
                    r"BatchNorm: expected NCHW or NHWC for data_layout, got 'NDHWC'"),
    "data_format-type": (lambda: BatchNorm2D(3, data_format=None), TypeError,  # type: ignore
                         r"BatchNorm2D: expected data_format to be a str"),
    "use_global_stats": (lambda: BatchNorm2D(3, use_global_stats="yes"),  # type: ignore
                         TypeError, r"BatchNorm2D: expected use_global_stats to be None, True or "
                                    r"False, got str"),
    "is_test": (lambda: BatchNorm(3, is_test=1), TypeError,  # type: ignore[arg-type]
                r"BatchNorm: expected is_test to be True or False, got int"),
    "trainable_statistics": (lambda: BatchNorm(3, trainable_statistics=None),  # type: ignore
                             TypeError, r"expected trainable_statistics to be True or False"),
    "act": (lambda: BatchNorm(3, act="rleu"), ValueError, r"act: unknown activation 'rleu'"),
    "dtype": (lambda: BatchNorm(3, dtype="int32"), ValueError,
              r"BatchNorm: expected dtype 'float32', 'float64' or 'float16'"),
    "name": (lambda: BatchNorm2D(3, name=7), TypeError,  # type: ignore[arg-type]
             r"BatchNorm2D: expected name to be a str or None, got int"),
    "weight_attr": (lambda: BatchNorm2D(3, weight_attr=5), TypeError,
                    r"BatchNorm2D: weight_attr: expected None, False, True, a ParamAttr"),
    "param_attr": (lambda: BatchNorm(3, param_attr=[1]), TypeError,
                   r"BatchNorm: param_attr: expected None, False, True, a ParamAttr.*got list"),
    "bias_attr": (lambda: SyncBatchNorm(3, bias_attr=2.0), TypeError,
                  r"SyncBatchNorm: bias_attr: expected"),
    "name-positional": (lambda: SyncBatchNorm(3, 0.9, 1e-5, None, None, "NCHW", "bn1"),
                        TypeError, r"got the str 'bn1'.*track_running_stats comes before name\. "
                                   r"Fix: pass name= by keyword"),
    "track_running_stats": (lambda: SyncBatchNorm(3, track_running_stats=1),  # type: ignore
                            TypeError, r"expected track_running_stats to be True or False"),
    "process_group": (lambda: SyncBatchNorm(3, process_group="world"), TypeError,
                      r"expected process_group to be a torch\.distributed\.ProcessGroup or None, "
                      r"got str"),
    "timeout": (lambda: SyncBatchNorm(3, timeout=0), ValueError,
                r"SyncBatchNorm: expected timeout to be a positive number of seconds"),
    "timeout-nan": (lambda: SyncBatchNorm(3, timeout=float("nan")), ValueError,
                    r"SyncBatchNorm: expected timeout to be a positive number .*got nan"),
}


@pytest.mark.parametrize(("make", "error", "match"), CONSTRUCTION_ERRORS.values(),
                         ids=CONSTRUCTION_ERRORS.keys())
def test_construction_errors(make: Callable[[], object], error: type[Exception],
                             match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def _mutated_format() -> None:
    layer = BatchNorm2D(3)
    layer.data_format = "XYZ"
    layer(torch.randn(2, 3, 4))  # wrong rank too: the format is reported first


FORWARD_ERRORS = {
    "rank-1d": (lambda: BatchNorm1D(3)(torch.randn(2, 3, 4, 4)), ValueError,
                r"^expected 2D or 3D input \(got 4D input\): BatchNorm1D takes"),
    "rank-2d": (lambda: BatchNorm2D(3)(torch.randn(2, 3, 4)), ValueError,
                r"^expected 4D input \(got 3D input\): BatchNorm2D takes .*'NHWC'\. "
                r"Fix: use BatchNorm1D for 3-D input\.$"),
    "rank-3d": (lambda: BatchNorm3D(3)(torch.randn(2, 3, 4, 4)), ValueError,
                r"^expected 5D input \(got 4D input\)"),
    "rank-sync": (lambda: SyncBatchNorm(3)(torch.randn(3)), ValueError,
                  r"^expected 2D to 5D input \(got 1D input\)"),
    "rank-old": (lambda: BatchNorm(3)(torch.randn(1, 3, 1, 1, 1, 1)), ValueError,
                 r"^expected 2D to 5D input \(got 6D input\)"),
    "format-before-rank": (_mutated_format, ValueError,
                           r"BatchNorm2D: expected NCHW or NHWC for data_format, got 'XYZ'"),
    "channels": (lambda: BatchNorm2D(3)(torch.randn(2, 4, 5, 5)), ValueError,
                 r"BatchNorm2D expected 3 channels at dim 1 \(data_format='NCHW'\), got 4 "
                 r"\(input shape \(2, 4, 5, 5\)\)\. Fix: build the layer with num_features=4, "
                 r"or pass the channel-last data_format"),
    "channels-last": (lambda: BatchNorm2D(3, data_format="NHWC")(torch.randn(2, 3, 5, 5)),
                      ValueError, r"expected 3 channels at the last axis \(data_format='NHWC'\), "
                                  r"got 5 .*channels-first data_format"),
    "channels-old": (lambda: BatchNorm(3)(torch.randn(2, 5)), ValueError,
                     r"BatchNorm expected 3 channels at dim 1 \(data_layout='NCHW'\), got 5.*"
                     r"num_channels=5"),
    "not-a-tensor": (lambda: BatchNorm2D(3)([[1.0]]), TypeError,
                     r"BatchNorm2D expected input to be a torch\.Tensor, got list"),
    "integer-input": (lambda: SyncBatchNorm(3)(torch.ones(2, 3, dtype=torch.int64)), TypeError,
                      r"SyncBatchNorm expected a floating-point input .*got torch\.int64"),
    "dtype-mismatch": (lambda: BatchNorm2D(3).eval()(torch.randn(2, 3, 2, 2,
                                                                 dtype=torch.float64)),
                       TypeError, r"BatchNorm2D has torch\.float32 parameters but got a "
                                  r"torch\.float64 input\. Fix: convert the layer"),
    "convert-not-a-module": (lambda: SyncBatchNorm.convert_sync_batchnorm("model"),  # type: ignore
                             TypeError, r"convert_sync_batchnorm expected an nn\.Module, got str"),
    "convert-process_group": (
        lambda: SyncBatchNorm.convert_sync_batchnorm(BatchNorm2D(3), process_group=3),
        TypeError, r"expected process_group to be a torch\.distributed\.ProcessGroup"),
}


@pytest.mark.parametrize(("call", "error", "match"), FORWARD_ERRORS.values(),
                         ids=FORWARD_ERRORS.keys())
def test_forward_errors(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# --- convert_sync_batchnorm ------------------------------------------------------------------


def test_convert_sync_batchnorm_tree() -> None:
    bn2 = BatchNorm2D(4, momentum=0.8, epsilon=1e-3, data_format="NHWC",
                      weight_attr=ParamAttr(learning_rate=0.5), name="stem").double().eval()
    bn1 = BatchNorm1D(3, weight_attr=False, data_format="NLC").double()
    bn3 = BatchNorm3D(2, use_global_stats=True)
    old, existing = BatchNorm(4), SyncBatchNorm(4)
    model = nn.Sequential(nn.Linear(2, 2), bn2, nn.Sequential(bn1, bn3), old, existing)
    before = {name: t for name, t in model.state_dict().items()}
    attrs_before = dict(bn2._paddle_param_attrs)

    assert SyncBatchNorm.convert_sync_batchnorm(model) is model
    new2, new1, new3 = model[1], model[2][0], model[2][1]
    assert all(isinstance(m, SyncBatchNorm) for m in (new2, new1, new3))
    assert model[3] is old and model[4] is existing  # the old BatchNorm is not converted
    assert (new2.momentum, new2.epsilon, new2.data_format, new2.name) == (0.8, 1e-3, "NHWC",
                                                                          "stem")
    assert new2.training is False and new1.training is True
    for name in ("weight", "bias", "_mean", "_variance"):
        assert getattr(new2, name) is getattr(bn2, name), name
    assert new1.bias is bn1.bias and new1._mean is bn1._mean
    assert new1.weight is None  # weight_attr=False stays absent: the same keys, scale 1
    assert new1.data_format == "NLC" and new3.use_global_stats is None
    assert get_param_attr(new2, "weight") == ParamAttr(learning_rate=0.5)
    assert (new2._syncbn_name, new1._syncbn_name) == ("1", "2.0")
    # the caller's layers are untouched
    assert isinstance(bn2, BatchNorm2D) and bn1.weight is None and bn2.data_format == "NHWC"
    assert bn2._paddle_param_attrs == attrs_before
    after = model.state_dict()
    for name, tensor in before.items():
        assert after[name] is tensor or torch.equal(after[name], tensor), name
    assert list(after) == list(before)  # exactly the original's keys, in order


def test_convert_bare_layer_returns_the_new_layer_and_trains_the_same() -> None:
    bn = _init(BatchNorm2D(3, momentum=0.7))
    twin = _init(BatchNorm2D(3, momentum=0.7))
    sync = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and sync is not bn
    x = _data((4, 3, 2, 3))
    assert torch.equal(sync(x), twin(x))  # no process group: the local batch is the batch
    assert torch.equal(bn._mean, twin._mean)  # shared statistics moved in the source too
    assert SyncBatchNorm.convert_sync_batchnorm(sync) is sync


def test_convert_frozen_weight_computes_as_before_and_trains_the_same() -> None:
    bn = _init(BatchNorm1D(3, weight_attr=False))
    twin = _init(BatchNorm1D(3, weight_attr=False))
    sync = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and sync.weight is None
    assert list(sync.state_dict()) == list(twin.state_dict()) == ["bias", "_mean", "_variance"]
    assert "weight" in SyncBatchNorm(3, weight_attr=False).state_dict()  # hand-built: Paddle's
    x = _data((6, 3)).requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    y, y_twin = sync(x), twin(x_twin)
    assert torch.equal(y, y_twin)
    y.square().sum().backward()
    y_twin.square().sum().backward()
    assert x.grad is not None and x_twin.grad is not None and torch.equal(x.grad, x_twin.grad)
    assert sync.bias is not None and twin.bias is not None and sync.bias.grad is not None
    assert twin.bias.grad is not None and torch.equal(sync.bias.grad, twin.bias.grad)
    assert torch.equal(sync._variance, twin._variance)


class _StockSubclass(BatchNorm2D):
    """Only a different constructor: it computes as BatchNorm2D."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.5)


class _OwnForward(BatchNorm2D):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 2


class _OwnStatistics(BatchNorm3D):
    def _statistics_mode(self) -> Any:
        return super()._statistics_mode()


class _FrozenByTrain(BatchNorm2D):
    """The frozen-BN idiom. Before issue 19's fix it was converted and trained: output moved
    by up to 7.9, ``_mean`` by 0.22 (one step, measured)."""

    def train(self, mode: bool = True) -> _FrozenByTrain:
        return super().train(False)


class _OwnLoading(BatchNorm1D):
    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)


class _Described(BatchNorm2D):
    """Only a description and a new helper: it behaves as BatchNorm2D."""

    def extra_repr(self) -> str:
        return "described"

    def freeze_later(self) -> None:
        self.eval()


def test_convert_subclass_without_own_computation() -> None:
    model = nn.Sequential(_StockSubclass(3), _Described(3))
    SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is SyncBatchNorm and model[0].momentum == 0.5
    assert type(model[1]) is SyncBatchNorm


@pytest.mark.parametrize(("cls", "what"), [(_OwnForward, "forward"),
                                           (_OwnStatistics, "_statistics_mode"),
                                           (_FrozenByTrain, "train"),
                                           (_OwnLoading, "_load_from_state_dict")])
def test_convert_refuses_subclass_with_own_computation(cls: type[_BatchNormBase],
                                                       what: str) -> None:
    first = BatchNorm2D(3)
    model = nn.Sequential(first, nn.Sequential(nn.Identity(), cls(3)))
    with pytest.raises(ValueError, match=(
            rf"cannot convert '1\.1' \(.*test_layers\.{cls.__name__}\): the class overrides "
            rf"{what}, .*silently compute something else.*Nothing was converted")):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert model[0] is first and type(model[1][1]) is cls  # untouched


def test_convert_refuses_a_method_replaced_on_the_instance() -> None:
    layer = BatchNorm1D(3)
    layer.train = lambda mode=True: layer  # type: ignore[method-assign, assignment, misc]
    with pytest.raises(ValueError, match=r"cannot convert '0' \(.*BatchNorm1D\): the layer's "
                                         r"train is replaced on the instance, which a "
                                         r"SyncBatchNorm would not run"):
        SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))
