"""What convert_sync_batchnorm refuses beyond a custom forward (issue 19, items 2 and 5).

Item 2: a ``_BatchNorm`` subclass that overrides behaviour (``train``/``eval``, state-dict
loading, resets, ``__call__``, …) was converted, because only ``forward``, parameters,
buffers and parametrizations were checked. Measured before the fix on the frozen-BN idiom
below (``train()`` always ``super().train(False)``): the converted layer trained, its
output moved by up to 7.2 and its running mean by 0.31.

Item 5: a BatchNorm inside TorchScript code stayed local after conversion, with no word.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import syncbn
from syncbn import convert

# --- item 2: behaviour overrides -----------------------------------------------------------


class _FrozenByTrain(nn.BatchNorm2d):
    """The common frozen-BN idiom: the layer never leaves eval mode."""

    def train(self, mode: bool = True) -> _FrozenByTrain:
        return super().train(False)


class _EvalOverride(nn.BatchNorm2d):
    def eval(self) -> _EvalOverride:
        return self


class _LoadsItsOwnWay(nn.BatchNorm1d):
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class _ResetsToOnes(nn.BatchNorm1d):
    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.running_mean.fill_(1.0)


class _InitsItsOwnWay(nn.BatchNorm1d):
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)


class _CallsItsOwnWay(nn.BatchNorm1d):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs) * 2


class _SetsItsOwnWay(nn.BatchNorm1d):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)


class _MomentumProperty(nn.BatchNorm1d):
    """A stock attribute replaced by a property: the stock forward reads it every step."""

    @property
    def momentum(self) -> float:
        return 0.0

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        pass


class _FreezeMixin:
    def train(self, mode: bool = True) -> Any:
        return super().train(False)  # type: ignore[misc]


class _FrozenByMixin(_FreezeMixin, nn.BatchNorm2d):
    """The override comes from a mixin, not from the class itself."""


class _SyncSubclassFrozen(nn.SyncBatchNorm):
    def train(self, mode: bool = True) -> _SyncSubclassFrozen:
        return super().train(False)


@pytest.mark.parametrize(("make", "names"), [
    (lambda: _FrozenByTrain(4), "train"),
    (lambda: _EvalOverride(4), "eval"),
    (lambda: _LoadsItsOwnWay(4), "_load_from_state_dict"),
    (lambda: _ResetsToOnes(4), "reset_running_stats"),
    (lambda: _InitsItsOwnWay(4), "reset_parameters"),
    (lambda: _CallsItsOwnWay(4), "__call__"),
    (lambda: _SetsItsOwnWay(4), "__setattr__"),
    (lambda: _MomentumProperty(4), "momentum"),
    (lambda: _FrozenByMixin(4), "train"),
    (lambda: _SyncSubclassFrozen(4), "train"),
], ids=["train", "eval", "load_from_state_dict", "reset_running_stats", "reset_parameters",
        "call", "setattr", "momentum-property", "mixin-train", "torch-syncbn-subclass"])
def test_behaviour_overrides_are_refused_with_path_class_and_fix(
        make: Callable[[], nn.Module], names: str) -> None:
    odd = make()
    cls = type(odd)
    first = nn.BatchNorm2d(4)
    model = nn.Sequential(first, nn.Sequential(nn.Identity(), odd))
    state = model.state_dict(keep_vars=True)
    with pytest.raises(ValueError, match=(
            rf"convert_sync_batchnorm cannot convert '1\.1' \({re.escape(cls.__module__)}\."
            rf"{re.escape(cls.__qualname__)}\): the class overrides {names}, which a "
            r"SyncBatchNorm would not run \(a subclass converts when it changes at most "
            r"__init__, extra_repr, __repr__, __str__ and _check_input_dim\)\. Fix: register "
            rf"how to convert it with syncbn\.register_conversion\({cls.__name__}, "
            r"to_sync=\.\.\., to_plain=\.\.\.\).*Nothing was converted\.")):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first and model[1][1] is odd  # untouched
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in state.items())


def test_several_overrides_are_all_named() -> None:
    class TwoOverrides(nn.BatchNorm1d):
        def train(self, mode: bool = True) -> TwoOverrides:
            return super().train(False)

        def reset_parameters(self) -> None:
            super().reset_parameters()

    with pytest.raises(ValueError, match=r"the class overrides reset_parameters, train, which"):
        syncbn.convert_sync_batchnorm(TwoOverrides(3))


@pytest.mark.parametrize("name", ["train", "eval", "_load_from_state_dict"])
def test_a_method_replaced_on_the_instance_is_refused(name: str) -> None:
    layer = nn.BatchNorm1d(3)
    setattr(layer, name, lambda *args, **kwargs: layer)
    with pytest.raises(ValueError, match=rf"cannot convert '0' \(torch\.nn\.modules\.batchnorm\."
                                         rf"BatchNorm1d\): the layer's {name} was replaced on "
                                         r"the instance; a SyncBatchNorm would not run it"):
        syncbn.convert_sync_batchnorm(nn.Sequential(layer))


def test_the_frozen_idiom_converts_once_a_conversion_is_registered() -> None:
    """The fix the message names works: a registered SyncBatchNorm subclass that stays frozen."""

    class FrozenSync(syncbn.SyncBatchNorm):
        def train(self, mode: bool = True) -> FrozenSync:
            return super().train(False)

    saved = dict(convert._RULES)
    try:
        syncbn.register_conversion(
            _FrozenByTrain,
            to_sync=lambda layer, group: convert.sync_layer_like(layer, group, FrozenSync),
            to_plain=lambda layer: convert.plain_layer_like(layer, _FrozenByTrain))
        torch.manual_seed(0)
        model = nn.Sequential(_FrozenByTrain(4))
        with torch.no_grad():
            model[0].running_mean.uniform_(-1, 1)
            model[0].running_var.uniform_(0.5, 2.0)
        twin = copy.deepcopy(model)
        syncbn.convert_sync_batchnorm(model)
        assert type(model[0]) is FrozenSync
        x = torch.randn(8, 4, 5, 5) * 3 + 2
        mean = model[0].running_mean.clone()
        assert torch.equal(model.train()(x), twin.train()(x))
        assert not model[0].training and torch.equal(model[0].running_mean, mean)
    finally:
        convert._RULES.clear()
        convert._RULES.update(saved)


def test_revert_refuses_a_syncbn_subclass_that_overrides_train() -> None:
    """The way back follows the same rule: a frozen SyncBatchNorm would become a training
    BatchNorm2d."""

    class FrozenSync(syncbn.SyncBatchNorm):
        def train(self, mode: bool = True) -> FrozenSync:
            return super().train(False)

    model = nn.Sequential(syncbn.SyncBatchNorm(3), FrozenSync(3))
    with pytest.raises(ValueError, match=r"cannot revert SyncBatchNorm\(3\) \(.*FrozenSync\): "
                                         r"the class has its own train and no registered way "
                                         r"back.*register_conversion"):
        syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm and type(model[1]) is FrozenSync


# what keeps converting: the classes of Lightning, mmengine and harmless changes


def _marked(function: Callable[..., Any]) -> Callable[..., Any]:
    """Stands for typing_extensions.override, which Lightning puts on _check_input_dim."""
    function.__override__ = True  # type: ignore[attr-defined]
    return function


class _LightningBatchNormXd(nn.modules.batchnorm._BatchNorm):
    """lightning.pytorch.plugins.layer_sync._BatchNormXd (Lightning 2.6.6): only this."""

    @_marked
    def _check_input_dim(self, input: Tensor) -> None:
        return


class _Described(nn.BatchNorm2d):
    """Only describes itself differently, adds a helper and a class constant."""

    kind = "described"

    def __init__(self, channels: int) -> None:
        super().__init__(channels, momentum=0.3)

    def extra_repr(self) -> str:
        return "described, " + super().extra_repr()

    def __repr__(self) -> str:
        return "Described()"

    def __str__(self) -> str:
        return "described"

    def freeze_later(self) -> None:  # a new name: no stock code calls it
        self.eval()


class _Aliased(nn.BatchNorm2d):
    """Names the stock method again: the very same function, so nothing is overridden."""

    train = nn.BatchNorm2d.train
    forward = nn.BatchNorm2d.forward


@pytest.mark.parametrize("cls", [_LightningBatchNormXd, _Described, _Aliased],
                         ids=["lightning-BatchNormXd", "repr-helper-constant", "aliased"])
def test_subclasses_that_behave_as_stock_still_convert_exactly(cls: type[nn.Module]) -> None:
    torch.manual_seed(2)
    layer = cls(4) if cls is not _LightningBatchNormXd else cls(4, momentum=0.3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
    twin = copy.deepcopy(layer)
    converted = syncbn.convert_sync_batchnorm(layer)
    assert type(converted) is syncbn.SyncBatchNorm and converted._syncbn_source_cls is cls
    x = torch.randn(6, 4, 3, 3)
    assert torch.equal(converted.train()(x), twin.train()(x))
    assert torch.equal(converted.running_mean, twin.running_mean)
    assert torch.equal(converted.eval()(x), twin.eval()(x))


def test_overridden_methods_rule() -> None:
    stock = convert._STOCK_CLASSES
    assert convert.overridden_methods(_FrozenByMixin, stock, convert.ALLOWED_OVERRIDES) == [
        "train"]
    assert convert.overridden_methods(_Described, stock, convert.ALLOWED_OVERRIDES) == []
    assert convert.overridden_methods(_Described, stock, ()) == [
        "__init__", "__repr__", "__str__", "extra_repr"]
    assert convert.overridden_methods(nn.BatchNorm3d, stock, ()) == []


# --- item 5: BatchNorm inside TorchScript code ---------------------------------------------


def _jit(make: Callable[[], nn.Module], how: str) -> nn.Module:
    """``torch.jit.script`` / ``trace`` (deprecated in torch 2.13; the warnings are theirs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if how == "script":
            return torch.jit.script(make())
        return torch.jit.trace(make(), torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_batchnorm_in_training_is_refused(how: str) -> None:
    """Before: converted without a word; the scripted layer stayed local (not synchronized)."""
    block = _jit(lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), how)
    first = nn.BatchNorm2d(3)
    model = nn.Sequential(first, block)
    with pytest.raises(ValueError, match=(
            r"convert_sync_batchnorm cannot convert '1\.0' \(a TorchScript BatchNorm2d, from "
            r"torch\.jit\.script, trace or load\): compiled TorchScript code keeps its own "
            r"layer, which would go on normalizing with this rank's batch only.*Fix: keep "
            r"that part a Python module while training.*call \.eval\(\) on it before "
            r"converting.*Nothing was converted\.")):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first and model[1] is block


def test_torchscript_root_is_named() -> None:
    with pytest.raises(ValueError, match=r"cannot convert '<root>' \(a TorchScript BatchNorm1d"):
        syncbn.convert_sync_batchnorm(_jit(lambda: nn.BatchNorm1d(3), "script"))


def test_torchscript_batchnorm_in_eval_is_left_with_a_warning() -> None:
    """Eval mode computes what a SyncBatchNorm would: kept (a frozen, loaded part), but said."""
    block = _jit(lambda: nn.Sequential(nn.BatchNorm2d(3)), "script").eval()
    model = nn.Sequential(nn.BatchNorm2d(3), block)
    with pytest.warns(RuntimeWarning, match=(
            r"convert_sync_batchnorm leaves '1\.0' \(a TorchScript BatchNorm2d.*\) as it is: "
            r"compiled TorchScript code cannot be changed\. It is in eval mode.*in training "
            r"mode it would normalize with this rank's batch only")) as record:
        syncbn.convert_sync_batchnorm(model)
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller's line
    assert type(model[0]) is syncbn.SyncBatchNorm and model[1] is block


class _FrozenStats(nn.Module):
    """A frozen BN that is not a ``_BatchNorm`` (as torchvision's FrozenBatchNorm2d)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.running_mean[:, None, None]) / self.running_var[:, None, None].sqrt()


def test_torchscript_parts_without_batchnorm_convert_silently() -> None:
    block = _jit(lambda: nn.Sequential(nn.Conv2d(3, 3, 1), _FrozenStats(3), nn.GroupNorm(1, 3)),
                 "script")
    model = nn.Sequential(nn.BatchNorm2d(3), block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm and model[1] is block
