"""Optimizer helpers honour ParamAttr: lr scale, L2/L1 decay, frozen, need_clip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncbn.paddle_compat import (
    Constant,
    L1Decay,
    L2Decay,
    ParamAttr,
    clippable_parameters,
    create_parameter,
    l1_penalty,
    optimizer_param_groups,
    resolve_param_attr,
)


class Affine(nn.Module):
    """y = x · weight + bias, parameters built from Paddle attrs."""

    def __init__(self, weight_attr: object = None, bias_attr: object = None) -> None:
        super().__init__()
        for name, value, fill in (("weight", weight_attr, 1.0), ("bias", bias_attr, 0.0)):
            spec = resolve_param_attr(
                value,
                arg_name=f"{name}_attr",
                default_initializer=Constant(fill),
                when_false="frozen",
            )
            create_parameter(self, name, spec, (3,), dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def test_groups_by_lr_and_decay() -> None:
    model = nn.Sequential(
        Affine(ParamAttr(learning_rate=0.5), L2Decay(0.3)),
        Affine(ParamAttr(learning_rate=0.5, regularizer=L1Decay(0.2)), False),
        nn.Linear(3, 3, dtype=torch.float64),
    )
    groups = optimizer_param_groups(model, base_lr=0.1, weight_decay=0.01)
    summary = [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [
        (pytest.approx(0.05), 0.01, 1),  # 0.weight: lr scale 0.5, optimizer decay
        (0.1, 0.3, 1),  # 0.bias: L2Decay(0.3) overrides the optimizer's decay
        (pytest.approx(0.05), 0.0, 1),  # 1.weight: L1Decay → no L2 term
        (0.1, 0.01, 2),  # Linear weight and bias; 1.bias is frozen and left out
    ]
    assert groups[0]["params"][0] is model[0].weight
    assert all(p is not model[1].bias for g in groups for p in g["params"])


def test_sgd_step_matches_paddle_update() -> None:
    torch.manual_seed(0)
    model = Affine(ParamAttr(learning_rate=0.5), ParamAttr(regularizer=L2Decay(0.3)))
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = torch.optim.SGD(optimizer_param_groups(model, base_lr=0.1, weight_decay=0.01), lr=0.1)
    model(x).square().sum().backward()
    gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
    opt.step()
    # Paddle: w ← w − lr·scale·(g + decay·w), decay = the param's L2Decay, else the optimizer's.
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * 0.5 * (gw + 0.01 * w0))
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * (gb + 0.3 * b0))


def test_l1_penalty_matches_paddle_update() -> None:
    torch.manual_seed(0)
    model = Affine(ParamAttr(learning_rate=2.0, regularizer=L1Decay(0.25)))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.5, 0.0, -2.0]))
    w0 = model.weight.detach().clone()
    assert l1_penalty(model).item() == pytest.approx(0.25 * 2.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    opt = torch.optim.SGD(optimizer_param_groups(model, base_lr=0.1, weight_decay=0.5), lr=0.1)
    (model(x).sum() + l1_penalty(model)).backward()
    grad_of_loss = x.sum(0)
    opt.step()
    # Paddle L1Decay: g ← g + coeff·sign(w) (sign(0) = 0), no L2 term, lr scaled by 2.
    expected = w0 - 0.1 * 2.0 * (grad_of_loss + 0.25 * torch.sign(w0))
    torch.testing.assert_close(model.weight.detach(), expected)
    assert expected[1] != 0.0
    assert w0[1] == 0.0


def test_l1_penalty_sums_and_skips() -> None:
    model = nn.Sequential(
        Affine(L1Decay(0.5), L1Decay(2.0)),
        Affine(ParamAttr(regularizer=L1Decay(1.0), trainable=False)),  # frozen: skipped
        nn.Linear(2, 2),
    )
    assert l1_penalty(model).item() == pytest.approx(0.5 * 3.0 + 2.0 * 0.0)
    assert l1_penalty(model).requires_grad


def test_l1_penalty_without_l1_is_a_zero_scalar() -> None:
    penalty = l1_penalty(nn.Linear(2, 2))
    assert penalty.shape == ()
    assert penalty.item() == 0.0
    assert (torch.ones(2, dtype=torch.float64) + penalty).dtype == torch.float64


def test_clippable_parameters() -> None:
    model = Affine(ParamAttr(need_clip=False), False)
    linear = nn.Linear(2, 2)
    params = clippable_parameters(nn.Sequential(model, linear))
    assert [id(p) for p in params] == [id(linear.weight), id(linear.bias)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"base_lr": -0.1}, ValueError, r"expected a finite base_lr >= 0, got -0.1"),
        ({"base_lr": "0.1"}, TypeError, r"expected base_lr to be a real number, got str"),
        ({"base_lr": 0.1, "weight_decay": float("nan")}, ValueError, r"finite weight_decay"),
    ],
    ids=["negative-lr", "str-lr", "nan-decay"],
)
def test_param_groups_validation(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        optimizer_param_groups(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]
