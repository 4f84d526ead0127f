"""ParamAttr, regularizers, the ``*_attr`` resolver and where attrs are recorded."""

from __future__ import annotations

import copy
import dataclasses
import io
from typing import Literal

import pytest
import torch
from torch import nn

from syncbn.paddle_compat import (
    Constant,
    L1Decay,
    L2Decay,
    ParamAttr,
    Uniform,
    attach_param_attr,
    copy_param_attrs,
    create_parameter,
    get_param_attr,
    named_param_attrs,
    resolve_param_attr,
)


def test_defaults_match_paddle() -> None:
    attr = ParamAttr()
    assert (
        attr.name,
        attr.initializer,
        attr.learning_rate,
        attr.regularizer,
        attr.trainable,
        attr.do_model_average,
        attr.need_clip,
    ) == (None, None, 1.0, None, True, True, True)


def test_positional_order_matches_paddle() -> None:
    attr = ParamAttr("w", Constant(2.0), 0.5, L2Decay(1e-4), False, False, False)
    assert attr == ParamAttr(
        name="w",
        initializer=Constant(2.0),
        learning_rate=0.5,
        regularizer=L2Decay(1e-4),
        trainable=False,
        do_model_average=False,
        need_clip=False,
    )
    assert isinstance(ParamAttr(learning_rate=2).learning_rate, float)


def test_param_attr_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParamAttr().learning_rate = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": 3}, TypeError, r"expected name to be a str or None, got int"),
        ({"learning_rate": "1"}, TypeError, r"expected learning_rate to be a real number"),
        ({"learning_rate": True}, TypeError, r"learning_rate .* got bool"),
        ({"learning_rate": -0.1}, ValueError, r"expected a finite learning_rate >= 0"),
        ({"learning_rate": float("inf")}, ValueError, r"finite learning_rate"),
        ({"regularizer": 1e-4}, TypeError, r"expected regularizer to be L1Decay, L2Decay"),
        ({"trainable": 1}, TypeError, r"expected trainable to be a bool, got int"),
        ({"need_clip": None}, TypeError, r"expected need_clip to be a bool"),
        ({"initializer": Constant}, TypeError, r"got the class Constant.*Constant\(\.\.\.\)"),
        ({"initializer": 1.0}, TypeError, r"expected an initializer \(a callable"),
    ],
    ids=[
        "int-name",
        "str-lr",
        "bool-lr",
        "negative-lr",
        "inf-lr",
        "float-regularizer",
        "int-trainable",
        "none-need-clip",
        "initializer-class",
        "float-initializer",
    ],
)
def test_param_attr_validation(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ParamAttr(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [L1Decay, L2Decay])
def test_regularizers(cls: type[L1Decay] | type[L2Decay]) -> None:
    assert cls().coeff == 0.0
    assert cls(1).coeff == 1.0
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected a finite coeff >= 0"):
        cls(-1.0)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: expected coeff to be a real number"):
        cls("1")  # type: ignore[arg-type]
    assert L1Decay(0.1) != L2Decay(0.1)


ONES = Constant(1.0)


def fill_seven(tensor: torch.Tensor) -> None:
    tensor.fill_(7.0)


@pytest.mark.parametrize(
    ("value", "create", "initializer", "trainable", "attr"),
    [
        (None, True, ONES, True, ParamAttr()),
        (True, True, ONES, True, ParamAttr()),
        ("scale_0", True, ONES, True, ParamAttr(name="scale_0")),
        (Constant(3.0), True, Constant(3.0), True, ParamAttr(initializer=Constant(3.0))),
        (fill_seven, True, fill_seven, True, ParamAttr(initializer=fill_seven)),
        (L2Decay(0.1), True, ONES, True, ParamAttr(regularizer=L2Decay(0.1))),
        (
            ParamAttr(learning_rate=0.5, trainable=False),
            True,
            ONES,
            False,
            ParamAttr(learning_rate=0.5, trainable=False),
        ),
        (
            ParamAttr(initializer=Uniform(0, 1)),
            True,
            Uniform(0, 1),
            True,
            ParamAttr(initializer=Uniform(0, 1)),
        ),
    ],
    ids=[
        "none",
        "true",
        "str-name",
        "initializer",
        "callable",
        "regularizer",
        "frozen-attr",
        "attr",
    ],
)
def test_resolve(
    value: object, create: bool, initializer: object, trainable: bool, attr: ParamAttr
) -> None:
    spec = resolve_param_attr(
        value, arg_name="weight_attr", default_initializer=ONES, when_false="absent"
    )
    assert (spec.create, spec.initializer, spec.trainable, spec.attr) == (
        create,
        initializer,
        trainable,
        attr,
    )
    assert spec.learning_rate == attr.learning_rate
    assert spec.regularizer == attr.regularizer


@pytest.mark.parametrize(("when_false", "create"), [("absent", False), ("frozen", True)])
def test_resolve_false(when_false: Literal["absent", "frozen"], create: bool) -> None:
    spec = resolve_param_attr(
        False, arg_name="bias_attr", default_initializer=Constant(0.0), when_false=when_false
    )
    assert spec.create is create
    assert spec.trainable is False
    assert spec.initializer == Constant(0.0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (5, r"weight_attr: expected None, False, True, a ParamAttr.*got int \(5\)"),
        ([ParamAttr()], r"weight_attr: expected .*got list"),
        (Constant, r"weight_attr: expected .*got the class Constant"),
        (ParamAttr, r"got the class ParamAttr"),
    ],
    ids=["int", "list", "initializer-class", "attr-class"],
)
def test_resolve_rejects(value: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        resolve_param_attr(
            value, arg_name="weight_attr", default_initializer=ONES, when_false="absent"
        )


def test_resolve_rejects_bad_when_false() -> None:
    with pytest.raises(ValueError, match=r"expected when_false='absent' or 'frozen', got 'none'"):
        resolve_param_attr(None, arg_name="w", default_initializer=ONES, when_false="none")  # type: ignore[arg-type]


class Shell(nn.Module):
    """A layer shell as the Paddle-flavour layers build theirs."""

    def __init__(self, weight_attr: object = None, bias_attr: object = None, n: int = 3) -> None:
        super().__init__()
        weight = resolve_param_attr(
            weight_attr, arg_name="weight_attr", default_initializer=ONES, when_false="absent"
        )
        bias = resolve_param_attr(
            bias_attr, arg_name="bias_attr", default_initializer=Constant(0.0), when_false="frozen"
        )
        create_parameter(self, "weight", weight, (n,), dtype=torch.float64)
        create_parameter(self, "bias", bias, (n,), dtype=torch.float64)


def test_create_parameter_defaults() -> None:
    layer = Shell()
    assert isinstance(layer.weight, nn.Parameter)
    assert layer.weight.requires_grad
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(layer.bias.detach(), torch.zeros(3, dtype=torch.float64))
    assert get_param_attr(layer, "weight") == ParamAttr()


def test_create_parameter_absent_and_frozen() -> None:
    layer = Shell(weight_attr=False, bias_attr=False)
    assert layer.weight is None
    assert "weight" in layer._parameters
    assert "weight" not in dict(layer.named_parameters())
    assert layer.bias.requires_grad is False
    assert torch.equal(layer.bias.detach(), torch.zeros(3, dtype=torch.float64))
    assert get_param_attr(layer, "bias") == ParamAttr(initializer=Constant(0.0), trainable=False)


def test_create_parameter_custom_attr() -> None:
    attr = ParamAttr(initializer=fill_seven, learning_rate=0.1, trainable=False)
    layer = Shell(weight_attr=attr)
    assert torch.equal(layer.weight.detach(), torch.full((3,), 7.0, dtype=torch.float64))
    assert layer.weight.requires_grad is False
    assert get_param_attr(layer, "weight") is attr


def test_create_parameter_rejects_resizing_initializer() -> None:
    def resize(tensor: torch.Tensor) -> None:
        tensor.resize_(2)

    with pytest.raises(ValueError, match=r"initializer of 'weight' changed its shape from \(3,\)"):
        Shell(weight_attr=resize)


@pytest.mark.parametrize(
    "roundtrip",
    [
        copy.deepcopy,
        lambda m: m.to(torch.float32),
        lambda m: torch.load(_saved(m), weights_only=False),
    ],
    ids=["deepcopy", "to-dtype", "torch-save-load"],
)
def test_attrs_survive(roundtrip: object) -> None:
    assert callable(roundtrip)
    attr = ParamAttr(learning_rate=0.25, regularizer=L1Decay(0.5))
    model = nn.Sequential(Shell(weight_attr=attr))
    copied = roundtrip(model)
    assert get_param_attr(copied[0], "weight") == attr


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_attach_param_attr_errors() -> None:
    layer = Shell(weight_attr=False)
    with pytest.raises(TypeError, match=r"expected an nn.Module, got Parameter"):
        attach_param_attr(layer.bias, "bias", ParamAttr())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a ParamAttr, got float"):
        attach_param_attr(layer, "bias", 0.1)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"Shell has no parameter 'weight' \(its parameters: \['bias'\]\)"
    ):
        attach_param_attr(layer, "weight", ParamAttr())


def test_get_param_attr_without_record() -> None:
    assert get_param_attr(nn.Linear(2, 2), "weight") is None


def test_copy_param_attrs() -> None:
    source = Shell(weight_attr=ParamAttr(learning_rate=0.5))
    target = Shell(weight_attr=False)
    copy_param_attrs(source, target)
    assert get_param_attr(target, "weight") is None  # target has no weight
    assert get_param_attr(target, "bias") == ParamAttr()
    target = Shell()
    copy_param_attrs(source, target)
    assert get_param_attr(target, "weight") == ParamAttr(learning_rate=0.5)


def test_named_param_attrs_walks_and_dedupes() -> None:
    inner = Shell(weight_attr=ParamAttr(learning_rate=0.5))
    plain = nn.Linear(2, 2)
    plain.weight = inner.weight  # shared: yielded once, under its first name
    model = nn.Sequential(inner, plain)
    rows = [(name, attr) for name, _, attr in named_param_attrs(model)]
    assert rows == [
        ("0.weight", ParamAttr(learning_rate=0.5)),
        ("0.bias", ParamAttr()),
        ("1.bias", None),
    ]


def test_named_param_attrs_takes_a_later_owners_record() -> None:
    plain = nn.Linear(3, 3)
    inner = Shell(weight_attr=ParamAttr(learning_rate=0.5))
    plain.bias = inner.weight  # first seen on `plain`, which has no record
    rows = {name: attr for name, _, attr in named_param_attrs(nn.Sequential(plain, inner))}
    assert rows["0.bias"] == ParamAttr(learning_rate=0.5)


# --- what a callable initializer may return ---------------------------------------------------


def _fill_returns_none(tensor: torch.Tensor) -> None:
    tensor.fill_(3.0)


def _fill_through_data(tensor: torch.Tensor) -> None:
    tensor.data.fill_(4.0)  # moves no version counter


def _fill_returns_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.fill_(5.0).unsqueeze(0)


@pytest.mark.parametrize(
    ("initializer", "value"),
    [
        (_fill_returns_none, 3.0),
        (_fill_through_data, 4.0),
        (_fill_returns_view, 5.0),
        (lambda t: torch.full(t.shape, 6.0, dtype=t.dtype), 6.0),  # a new tensor: copied in
        (lambda t: t.fill_(7.0), 7.0),
        (lambda t: nn.init.constant_(t, 8.0), 8.0),
    ],
    ids=["in-place-None", "via-.data", "view", "new-tensor", "returns-self", "nn.init"],
)
def test_callable_initializer_results_fill_the_parameter(initializer: object, value: float) -> None:
    layer = Shell(weight_attr=ParamAttr(initializer=initializer))  # type: ignore[arg-type]
    assert torch.equal(layer.weight.detach(), torch.full((3,), value, dtype=torch.float64))


def test_new_tensor_from_initializer_is_a_copy() -> None:
    made: list[torch.Tensor] = []

    def fresh(tensor: torch.Tensor) -> torch.Tensor:
        made.append(torch.arange(3, dtype=tensor.dtype))
        return made[-1]

    layer = Shell(weight_attr=fresh)
    made[0].zero_()  # the parameter does not alias the returned tensor
    assert layer.weight.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("initializer", "error", "match"),
    [
        (lambda t: None, ValueError,
         r"initializer of 'weight' \(.*\) returned None and did not write to the tensor it was "
         r"given.*Fix: fill the tensor in place .* or return a new tensor of shape \(3,\) and "
         r"dtype torch\.float64"),
        (lambda t: torch.ones(4, dtype=t.dtype), ValueError,
         r"initializer of 'weight' .* returned a tensor of shape \(4,\); expected shape \(3,\) "
         r"and dtype torch\.float64"),
        (lambda t: torch.ones(3, dtype=torch.float32), TypeError,
         r"returned a torch\.float32 tensor; expected shape \(3,\) and dtype torch\.float64.*"
         r"Fix: return result\.to\(torch\.float64\)"),
        (lambda t: [1.0, 1.0, 1.0], TypeError,
         r"returned a list; expected None or a torch\.Tensor"),
        (lambda t: 1.0, TypeError, r"returned a float; expected None or a torch\.Tensor"),
    ],
    ids=["None-unwritten", "wrong-shape", "wrong-dtype", "list", "float"],
)
def test_callable_initializer_bad_results_are_clear_errors(
    initializer: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Shell(weight_attr=ParamAttr(initializer=initializer))  # type: ignore[arg-type]


def test_paddle_layer_with_new_tensor_initializer() -> None:
    from syncbn.paddle_compat import BatchNorm2D

    layer = BatchNorm2D(4, weight_attr=ParamAttr(initializer=lambda t: torch.full_like(t, 2.0)))
    assert torch.equal(layer.weight.detach(), torch.full((4,), 2.0))
    with pytest.raises(ValueError, match=r"returned None and did not write"):
        BatchNorm2D(4, bias_attr=ParamAttr(initializer=lambda t: None))


def test_initializers_on_the_meta_device() -> None:
    from syncbn.paddle_compat import BatchNorm2D

    with torch.device("meta"):
        layer = BatchNorm2D(4, weight_attr=ParamAttr(initializer=lambda t: torch.ones_like(t)))
    assert layer.weight.is_meta and layer.bias.is_meta
