"""convert_sync_batchnorm / revert_sync_batchnorm and checkpoint compatibility."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import syncbn


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
