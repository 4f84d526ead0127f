"""convert_sync_batchnorm / revert_sync_batchnorm and checkpoint compatibility."""

from __future__ import annotations

import ast
import copy
import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

import syncbn
import syncbn.modules
from syncbn import convert


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, momentum=None), nn.Flatten()),
        nn.ModuleDict({"bn3": nn.BatchNorm3d(4, affine=False),
                       "sync": nn.SyncBatchNorm(4, eps=1e-3, track_running_stats=False)}),
    )


def _norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_replaces_every_batchnorm_and_shares_state() -> None:
    model = _model().double()
    model[1].weight.requires_grad_(False)
    model[2].eval()
    before = {n: m for n, m in _norm_layers(model)}
    tensors = {n: [m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked]
               for n, m in before.items()}
    out = syncbn.convert_sync_batchnorm(model)
    assert out is model
    after = dict(_norm_layers(model))
    assert set(after) == set(before)
    for name, layer in after.items():
        assert type(layer) is syncbn.SyncBatchNorm, name
        old = before[name]
        assert layer._syncbn_source_cls is type(old)
        for mine, theirs in zip([layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                 layer.num_batches_tracked], tensors[name], strict=True):
            assert mine is theirs, name  # the very same tensors
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                     "training"):
            assert getattr(layer, attr) == getattr(old, attr), (name, attr)
    assert not model[1].weight.requires_grad
    assert not model[2][1].training
    assert model[1].weight.dtype == torch.float64 and model[1].weight.device.type == "cpu"


def test_convert_a_bare_layer_returns_the_new_layer() -> None:
    bn = nn.BatchNorm1d(5)
    out = syncbn.convert_sync_batchnorm(bn)
    assert type(out) is syncbn.SyncBatchNorm and out.weight is bn.weight
    assert type(syncbn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(2))) is (
        syncbn.SyncBatchNorm
    )


def test_convert_keeps_existing_syncbn_layers() -> None:
    layer = syncbn.SyncBatchNorm(3)
    assert syncbn.convert_sync_batchnorm(layer) is layer


def test_convert_refuses_uninitialized_lazy_batchnorm() -> None:
    with pytest.raises(ValueError, match=r"uninitialized LazyBatchNorm2d.*run one forward pass"):
        syncbn.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [(("not a module",), TypeError, r"expected an nn.Module, got str"),
     ((nn.BatchNorm2d(2), 42), TypeError, r"ProcessGroup or None, got int")],
    ids=["not-a-module", "bad-group"],
)
def test_convert_errors(args: tuple[object, ...], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        syncbn.convert_sync_batchnorm(*args)  # type: ignore[arg-type]


def test_convert_accepts_the_non_member_placeholder() -> None:
    """On a rank outside a group, ``new_group`` returns a placeholder; conversion takes it
    (as torch's does), eval runs, and a training forward refuses it naming the layer. The
    3-rank case is in test_torch_conformance.py."""
    placeholder = torch.distributed.GroupMember.NON_GROUP_MEMBER
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model), process_group=placeholder)
    assert converted[1].process_group == placeholder
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(converted)(x), expected, rtol=0, atol=0)
    converted.train()
    with pytest.raises(ValueError, match=(
            r"^SyncBatchNorm '1''s process_group does not include this rank \(no process "
            r"group is initialized\): .* where the layer can only evaluate")):
        converted(x)
    layer = syncbn.SyncBatchNorm(4, process_group=placeholder)
    assert layer.process_group == placeholder


def test_revert_restores_source_classes_losslessly() -> None:
    model = _model()
    classes = {n: type(m) for n, m in _norm_layers(model)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    syncbn.revert_sync_batchnorm(syncbn.convert_sync_batchnorm(model))
    for name, layer in _norm_layers(model):
        want = classes[name] if classes[name] is not nn.SyncBatchNorm else nn.BatchNorm2d
        assert type(layer) is want, name
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(("shape", "cls"), [((4, 3), nn.BatchNorm1d), ((4, 3, 5), nn.BatchNorm1d),
                                            ((2, 3, 4, 4), nn.BatchNorm2d),
                                            ((2, 3, 2, 2, 2), nn.BatchNorm3d)])
def test_revert_infers_class_from_last_input_rank(shape: tuple[int, ...], cls: type) -> None:
    layer = syncbn.SyncBatchNorm(3)
    layer(torch.randn(shape))
    reverted = syncbn.revert_sync_batchnorm(layer)
    assert type(reverted) is cls
    assert reverted.num_batches_tracked.item() == 1


def test_revert_defaults_to_batchnorm2d() -> None:
    assert type(syncbn.revert_sync_batchnorm(syncbn.SyncBatchNorm(3))) is nn.BatchNorm2d


def test_reverted_model_exports() -> None:
    model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    model(torch.randn(4, 1, 5, 5))
    model = syncbn.revert_sync_batchnorm(model).eval()
    x = torch.randn(1, 1, 5, 5)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("source", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_checkpoints_load_both_ways(source: type[nn.Module]) -> None:
    theirs = source(4)
    with torch.no_grad():
        for tensor in (theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var):
            tensor.uniform_(0.5, 1.5)
        theirs.num_batches_tracked.fill_(7)
    mine = syncbn.SyncBatchNorm(4)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    mine.load_state_dict(torch.load(buffer))
    for key, value in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value), key
    back = source(4)
    back.load_state_dict(mine.state_dict())
    for key, value in mine.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


# --- which classes convert, which are refused ----------------------------------------------


class _BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """What Lightning's and mmengine's revert_sync_batchnorm produce: only _BatchNorm, any rank."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return


class _OwnInit(nn.BatchNorm2d):
    """A subclass that only changes the constructor: it runs the stock forward."""

    def __init__(self, channels: int, *, eps: float = 1e-3) -> None:
        super().__init__(channels, eps=eps)


class _FrozenBN(nn.BatchNorm2d):
    """A user's frozen BN: always the running statistics, even in training."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(input, self.running_mean, self.running_var,
                                        self.weight, self.bias, False, 0.0, self.eps)


class _ExtraBuffer(nn.BatchNorm1d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.register_buffer("scale", torch.ones(channels))


class _FrozenSync(syncbn.SyncBatchNorm):
    """The registered conversion of _FrozenBN: a SyncBatchNorm that always uses running stats."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(input, self.running_mean, self.running_var,
                                        self.weight, self.bias, False, 0.0, self.eps)


@pytest.fixture
def rules() -> Iterator[dict[type, object]]:
    """The conversion registry, restored after the test."""
    saved = dict(convert._RULES)
    yield convert._RULES
    convert._RULES.clear()
    convert._RULES.update(saved)


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5
                             if name.endswith(("var", "weight")) else
                             torch.randn(tensor.shape, generator=gen))
    return model


def _zoo() -> nn.Sequential:
    torch.manual_seed(1)
    return _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), _BatchNormXd(4), _OwnInit(4),
                                    nn.Sequential(nn.BatchNorm2d(4, affine=False))))


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, **{k: v.clone() for k, v in model.state_dict().items()}}


def test_stock_forward_subclasses_convert_exactly_and_revert_to_their_class() -> None:
    x = torch.randn(5, 3, 6, 6)
    model, twin = _zoo(), _zoo()
    syncbn.convert_sync_batchnorm(model)
    assert [type(m) for m in model.modules() if isinstance(m, _BatchNorm)] == [
        syncbn.SyncBatchNorm] * 3
    assert model[1]._syncbn_source_cls is _BatchNormXd and model[2].eps == 1e-3
    assert torch.equal(model.eval()(x), twin.eval()(x))
    out, state = _train_step(model, x)
    out_twin, state_twin = _train_step(twin, x)
    assert torch.equal(out, out_twin)
    assert state.keys() == state_twin.keys()
    for key, value in state.items():
        assert torch.equal(value, state_twin[key]), key
    syncbn.revert_sync_batchnorm(model)
    # _OwnInit cannot be built with BatchNorm's arguments: its BatchNorm2d base, same forward
    assert [type(m) for m in model.modules() if isinstance(m, _BatchNorm)] == [
        _BatchNormXd, nn.BatchNorm2d, nn.BatchNorm2d]
    assert torch.equal(model.eval()(x), twin.eval()(x))


def test_every_converted_layer_is_a_torch_batchnorm() -> None:
    model = syncbn.convert_sync_batchnorm(nn.Sequential(_model(), _zoo()))
    layers = [m for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert len(layers) == 7
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layers)


@pytest.mark.parametrize(("make", "problem"), [
    (lambda: _FrozenBN(4), r"class has its own forward, which a SyncBatchNorm would not run"),
    (lambda: _ExtraBuffer(4),
     r"class has parameters or buffers that differ from BatchNorm's \(scale\)"),
    (lambda: parametrize.register_parametrization(nn.BatchNorm1d(4), "weight", nn.Identity()),
     r"layer is parametrized"),
], ids=["own-forward", "extra-buffer", "parametrized"])
def test_refuses_what_would_compute_differently_and_changes_nothing(
        make: Callable[[], nn.Module], problem: str) -> None:
    odd = make()
    cls = type(odd)
    first = nn.BatchNorm2d(4)
    model = nn.Sequential(first, nn.ModuleDict({"block": nn.Sequential(nn.Identity(), odd)}))
    state = model.state_dict(keep_vars=True)
    with pytest.raises(ValueError, match=(
            rf"cannot convert '1\.block\.1' \({cls.__module__}\.{cls.__qualname__}\): the "
            rf"{problem}.*Fix: register how to convert it with "
            rf"syncbn\.register_conversion\({cls.__name__}, to_sync=\.\.\., to_plain=\.\.\.\).*"
            r"Nothing was converted")):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first and model[1]["block"][1] is odd  # untouched
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in state.items())


def test_refuses_a_forward_replaced_on_the_instance() -> None:
    layer = nn.BatchNorm1d(3)
    layer.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"cannot convert '0' \(torch\.nn\.modules\.batchnorm\."
                                         r"BatchNorm1d\): the layer's forward was replaced on "
                                         r"the instance"):
        syncbn.convert_sync_batchnorm(nn.Sequential(layer))


def test_refuses_a_bare_layer_by_root() -> None:
    with pytest.raises(ValueError, match=r"cannot convert '<root>' \(.*_FrozenBN\)"):
        syncbn.convert_sync_batchnorm(_FrozenBN(2))


# --- registering a conversion --------------------------------------------------------------


def _frozen_to_sync(layer: nn.Module, group: object) -> syncbn.SyncBatchNorm:
    assert isinstance(layer, _FrozenBN)
    return convert.sync_layer_like(layer, None, _FrozenSync)


def _frozen_to_plain(layer: syncbn.SyncBatchNorm) -> nn.Module:
    return convert.plain_layer_like(layer, _FrozenBN)


def test_registered_conversion_round_trip(rules: dict[type, object]) -> None:
    syncbn.register_conversion(_FrozenBN, to_sync=_frozen_to_sync, to_plain=_frozen_to_plain)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), _FrozenBN(4), nn.BatchNorm2d(4)))
    twin = copy.deepcopy(model)
    tensors = list(model.state_dict(keep_vars=True).values())
    syncbn.convert_sync_batchnorm(model)
    assert type(model[1]) is _FrozenSync and type(model[2]) is syncbn.SyncBatchNorm
    assert model[1]._syncbn_source_cls is _FrozenBN and model[1].layer_name == "1"
    assert all(a is b for a, b in zip(model.state_dict(keep_vars=True).values(), tensors,
                                      strict=True))
    x = torch.randn(4, 3, 5, 5)
    out, state = _train_step(model, x)
    out_twin, state_twin = _train_step(twin, x)
    assert torch.equal(out, out_twin)
    for key, value in state.items():
        assert torch.equal(value, state_twin[key]), key
    syncbn.revert_sync_batchnorm(model)
    assert type(model[1]) is _FrozenBN and type(model[2]) is nn.BatchNorm2d
    assert all(a is b for a, b in zip(model.state_dict(keep_vars=True).values(), tensors,
                                      strict=True))


def test_register_replace_false_keeps_the_first_rule(rules: dict[type, object]) -> None:
    syncbn.register_conversion(_FrozenBN, to_sync=_frozen_to_sync, to_plain=_frozen_to_plain)
    syncbn.register_conversion(_FrozenBN, to_sync=lambda layer, group: syncbn.SyncBatchNorm(4),
                               to_plain=_frozen_to_plain, replace=False)
    assert type(syncbn.convert_sync_batchnorm(_FrozenBN(4))) is _FrozenSync
    syncbn.register_conversion(_FrozenBN, to_sync=lambda layer, group: syncbn.SyncBatchNorm(4),
                               to_plain=_frozen_to_plain)
    assert type(syncbn.convert_sync_batchnorm(_FrozenBN(4))) is syncbn.SyncBatchNorm


def test_registered_to_sync_must_return_a_syncbn_layer(rules: dict[type, object]) -> None:
    syncbn.register_conversion(_FrozenBN, to_sync=lambda layer, group: nn.BatchNorm2d(4),  # type: ignore[arg-type, return-value]
                               to_plain=_frozen_to_plain)
    first = nn.BatchNorm2d(4)
    model = nn.Sequential(first, _FrozenBN(4))
    with pytest.raises(TypeError, match=r"registered for .*_FrozenBN returned a BatchNorm2d for "
                                        r"'1', expected a syncbn\.SyncBatchNorm"):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first


@pytest.mark.parametrize(("args", "pattern"), [
    ((nn.BatchNorm2d(2),), r"source_cls to be an nn.Module subclass, got BatchNorm2d"),
    ((int,), r"source_cls to be an nn.Module subclass, got <class 'int'>"),
    ((_FrozenBN, "no"), r"to_sync to be callable, got str"),
], ids=["instance", "not-a-module", "not-callable"])
def test_register_errors(args: tuple[object, ...], pattern: str,
                         rules: dict[type, object]) -> None:
    kwargs = {"to_sync": args[1] if len(args) > 1 else _frozen_to_sync,
              "to_plain": _frozen_to_plain}
    with pytest.raises(TypeError, match=pattern):
        syncbn.register_conversion(args[0], **kwargs)  # type: ignore[arg-type]
    assert _FrozenBN not in rules


# --- details -------------------------------------------------------------------------------


def test_hooks_and_sharing_survive_conversion() -> None:
    shared = nn.BatchNorm1d(3)
    seen: list[tuple[int, ...]] = []
    handle = shared.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    model = syncbn.convert_sync_batchnorm(nn.Sequential(shared, nn.Sequential(shared)))
    assert model[0] is model[1][0] and type(model[0]) is syncbn.SyncBatchNorm
    model(torch.randn(4, 3))
    assert seen == [(4, 3), (4, 3)]
    handle.remove()
    model(torch.randn(4, 3))
    assert len(seen) == 2


def test_revert_without_recorded_rank_or_source() -> None:
    layer = syncbn.SyncBatchNorm(3)
    layer(torch.randn(4, 3))
    del layer._syncbn_input_ndim, layer._syncbn_source_cls  # e.g. never written under compile
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm2d
    converted = syncbn.convert_sync_batchnorm(nn.BatchNorm3d(3))
    del converted._syncbn_input_ndim
    assert type(syncbn.revert_sync_batchnorm(converted)) is nn.BatchNorm3d


def test_revert_refuses_a_syncbn_subclass_without_a_way_back() -> None:
    layer = _FrozenSync(3)
    model = nn.Sequential(syncbn.SyncBatchNorm(3), layer)
    with pytest.raises(ValueError, match=r"cannot revert SyncBatchNorm\(3\) \(.*_FrozenSync\): "
                                         r"the class has its own forward and no registered way "
                                         r"back.*register_conversion"):
        syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm and model[1] is layer


def test_import_syncbn_stays_torch_only() -> None:
    code = ("import sys, torch, syncbn\n"
            "syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2)))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'timm'"
            " or m.startswith('syncbn.integrations')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_modules_does_not_import_convert() -> None:
    tree = ast.parse(Path(syncbn.modules.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not any(name and name.endswith("convert") for name in imported), imported
    assert syncbn.SyncBatchNorm.convert_sync_batchnorm is syncbn.convert_sync_batchnorm
