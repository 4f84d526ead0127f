"""Real model zoos: timm and torchvision models convert exactly, train the same, revert.

Every model is built with random weights (``pretrained=False``) in float32 and run on
a small batch; its BatchNorm tensors are randomized first, so the eval check
compares non-trivial running statistics. "Exactly" is bitwise: with no process
group, :class:`syncbn.SyncBatchNorm` is ``torch.nn.BatchNorm{1,2,3}d``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial
from typing import Any

import pytest
import timm
import timm.layers
import torch
import torch.distributed as dist
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import harness
import syncbn
from syncbn.integrations.timm import SyncBatchNormAct

# (name, input side): the smallest variant of each family, at a small input
TIMM_MODELS = {
    "efficientnet_b0": 64,  # EfficientNet
    "tinynet_e": 64,  # EfficientNet (scaled down)
    "mobilenetv3_small_050": 64,  # MobileNetV3
    "mobilenetv4_conv_small_035": 64,  # MobileNetV4
    "regnetx_002": 64,  # RegNet
    "densenet121": 64,  # DenseNet
    "resnetv2_50": 64,  # ResNetV2
    "cspresnet50": 64,  # CSPNet
    "dpn48b": 64,  # DPN
    "ese_vovnet19b_dw": 64,  # VoVNet
    "xception41p": 64,  # Xception
    "inception_v3": 75,  # Inception (its minimum input)
    "rexnet_100": 64,  # RexNet (BatchNormAct2d and BatchNorm2d)
    "tresnet_m": 64,  # TResNet
    "fbnetc_100": 64,  # FBNet
    "mixnet_s": 64,  # MixNet
    "lcnet_050": 64,  # LCNet
    "repvgg_a0": 64,  # ByobNet
    "ghostnet_050": 64,  # GhostNet (mostly BatchNorm2d)
}
TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
                      "regnet_x_400mf", "mnasnet0_5"]


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, _BatchNorm):
                c = layer.num_features
                if layer.weight is not None:
                    layer.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    layer.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                if layer.running_mean is not None:
                    layer.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    layer.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def _build(kind: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return _randomize_norms(model)


def _classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def _norm_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, _BatchNorm)}


def _train_step(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward and backward in training mode: the output, gradients and the state."""
    model.train()
    torch.manual_seed(1)  # the same dropout / drop-path / DropBlock draws for both
    out = model(x)
    out.square().mean().backward()
    grads = {f"grad:{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, **model.state_dict()}


def _check_model(model: nn.Module, side: int) -> None:
    """Eval output, one training step and revert: all bitwise equal to the original."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
    twin = copy.deepcopy(model)
    classes, keys = _classes(model), list(model.state_dict())
    with torch.no_grad():
        expected = model.eval()(x)

    syncbn.convert_sync_batchnorm(model)
    converted = [m for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert converted and not (_norm_classes(model) - {syncbn.SyncBatchNorm, SyncBatchNormAct})
    assert all(isinstance(m, _BatchNorm) for m in converted)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)

    out, state = _train_step(model, x)
    out_twin, state_twin = _train_step(twin, x)
    assert torch.equal(out, out_twin)
    assert state.keys() == state_twin.keys()
    differ = [k for k, v in state.items() if not torch.equal(v, state_twin[k])]
    assert not differ, differ[:5]

    syncbn.revert_sync_batchnorm(model)
    assert _classes(model) == classes
    with torch.no_grad():
        assert torch.equal(model.eval()(x), twin.eval()(x))


@pytest.mark.parametrize(("name", "side"), TIMM_MODELS.items(), ids=TIMM_MODELS.keys())
def test_timm_model_converts_exactly(name: str, side: int) -> None:
    model = _build("timm", name)
    assert _norm_classes(model) & {timm.layers.BatchNormAct2d, nn.BatchNorm2d}
    _check_model(model, side)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_converts_exactly(name: str) -> None:
    _check_model(_build("torchvision", name), 64)


# --- BatchNormAct2d in detail --------------------------------------------------------------


def _bn_act(**kwargs: Any) -> Any:
    layer = timm.layers.BatchNormAct2d(4, **kwargs)
    return _randomize_norms(layer)


@pytest.mark.parametrize("children", [
    {"act_layer": nn.SiLU, "drop_layer": partial(timm.layers.DropBlock2d, drop_prob=0.3,
                                                 block_size=3)},
    {"act_layer": nn.Hardswish}, {"act_layer": nn.GELU}, {"act_layer": nn.ReLU, "inplace": True},
    {"apply_act": False}, {"act_layer": "leaky_relu", "momentum": None},
], ids=["silu-dropblock", "hardswish", "gelu", "relu-inplace", "identity", "leaky-cumulative"])
def test_batchnormact_keeps_and_runs_its_children(children: dict[str, Any]) -> None:
    layer = _bn_act(**children)
    act, drop = layer.act, layer.drop
    tensors = dict(layer.state_dict(keep_vars=True))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    twin = copy.deepcopy(model)
    syncbn.convert_sync_batchnorm(model)
    new = model[1]
    assert type(new) is SyncBatchNormAct and new.act is act and new.drop is drop
    assert isinstance(new, _BatchNorm) and new.momentum == layer.momentum
    assert new._syncbn_source_cls is timm.layers.BatchNormAct2d
    assert dict(new.state_dict(keep_vars=True)) == tensors
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        out, state = _train_step(model, x)
        out_twin, state_twin = _train_step(twin, x)
        assert torch.equal(out, out_twin)
        assert all(torch.equal(v, state_twin[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), twin.eval()(x))
    syncbn.revert_sync_batchnorm(model)
    back = model[1]
    assert type(back) is timm.layers.BatchNormAct2d and back.act is act and back.drop is drop
    assert dict(back.state_dict(keep_vars=True)) == tensors


def test_timm_syncbatchnormact_converts_and_reverts_to_batchnormact() -> None:
    model = timm.layers.convert_sync_batchnorm(nn.Sequential(_bn_act(act_layer=nn.SiLU),
                                                             nn.BatchNorm2d(4)))
    assert type(model[0]) is timm.layers.SyncBatchNormAct
    twin = copy.deepcopy(model).eval()
    x = torch.randn(2, 4, 3, 3)
    syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is SyncBatchNormAct and type(model[1]) is syncbn.SyncBatchNorm
    with torch.no_grad():
        assert torch.equal(model.eval()(x), twin(x))
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is timm.layers.BatchNormAct2d and type(model[1]) is nn.BatchNorm2d
    assert isinstance(model[0].act, nn.SiLU)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_hand_built_syncbatchnormact_reverts_to_batchnormact() -> None:
    layer = SyncBatchNormAct(3, act=nn.SiLU())
    x = torch.randn(4, 3, 2, 2)
    want = nn.functional.silu(nn.functional.batch_norm(x, None, None, training=True))
    assert torch.allclose(layer(x), want, atol=1e-6)
    back = syncbn.revert_sync_batchnorm(layer)
    assert type(back) is timm.layers.BatchNormAct2d and isinstance(back.act, nn.SiLU)
    assert isinstance(back.drop, nn.Identity)  # it had none: Identity, not a default


# --- refusals ------------------------------------------------------------------------------


class _FrozenBN(nn.BatchNorm2d):
    """A user's frozen BN: always the running statistics."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.batch_norm(input, self.running_mean, self.running_var,
                                        self.weight, self.bias, False, 0.0, self.eps)


def test_splitbn_model_is_refused_with_its_path_and_left_untouched() -> None:
    model = timm.layers.convert_splitbn_model(timm.create_model("resnet18", pretrained=False), 2)
    classes = _classes(model)
    with pytest.raises(ValueError, match=(
            r"cannot convert 'bn1' \(timm\.layers\.split_batchnorm\.SplitBatchNorm2d\): the class "
            r"has its own forward.*syncbn\.register_conversion\(SplitBatchNorm2d, ")):
        syncbn.convert_sync_batchnorm(model)
    assert _classes(model) == classes


def test_user_frozen_bn_in_a_timm_model_is_refused() -> None:
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    model.blocks[1][0].bn1 = _FrozenBN(model.blocks[1][0].bn1.num_features)
    classes = _classes(model)
    with pytest.raises(ValueError,
                       match=r"cannot convert 'blocks\.1\.0\.bn1' \(test_zoo\._FrozenBN"):
        syncbn.convert_sync_batchnorm(model)
    assert _classes(model) == classes


def test_lightning_batchnormxd_round_trip() -> None:
    layer_sync = pytest.importorskip("lightning.pytorch.plugins.layer_sync")
    model = layer_sync.TorchSyncBatchNorm().revert(
        nn.SyncBatchNorm.convert_sync_batchnorm(_build("torchvision", "resnet18")))
    assert _norm_classes(model) == {layer_sync._BatchNormXd}
    _check_model(model, 64)


def test_import_syncbn_does_not_import_timm() -> None:
    code = ("import sys, torch, syncbn\n"
            "syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2)))\n"
            "assert 'timm' not in sys.modules and 'syncbn.integrations.timm' not in sys.modules\n"
            "import timm\n"
            "syncbn.convert_sync_batchnorm(timm.create_model('lcnet_050'))\n"
            "print('syncbn.integrations.timm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # loaded on meeting timm's classes


# --- two gloo ranks against one process on the global batch --------------------------------


class _ChannelGate(nn.Module):
    """A deterministic, trainable ``drop`` child, so the distributed check sees it run."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate.view(1, -1, 1, 1)


def _tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=_ChannelGate),
        nn.Conv2d(6, 6, 3, padding=1, groups=2),
        timm.layers.BatchNormAct2d(6, act_layer=nn.Hardswish, momentum=None),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()


SIZES = (3, 2)  # uneven per-rank batches
STEPS = 3


def _global_batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(SIZES), 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(sum(SIZES), 3, generator=gen, dtype=torch.float64)


def _train(model: nn.Module, rows: slice, distributed: bool) -> dict[str, Tensor]:
    """SGD on the summed squared error of ``rows`` of each global batch; gradients summed."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, target = _global_batch(step)
        opt.zero_grad()
        (model(x[rows]) - target[rows]).square().sum().backward()
        if distributed:
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rank_train() -> dict[str, Tensor]:
    rank = dist.get_rank()
    start = sum(SIZES[:rank])
    model = syncbn.convert_sync_batchnorm(_tiny_net())
    assert [type(m) for m in model.modules()].count(SyncBatchNormAct) == 2
    return _train(model, slice(start, start + SIZES[rank]), distributed=True)


def test_batchnormact_net_trains_on_two_ranks_as_on_the_global_batch() -> None:
    expected = _train(_tiny_net(), slice(None), distributed=False)
    results = harness.run_ranks(2, _rank_train, timeout=120)
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, k=key, r=rank: f"rank {r}, {k}: {m}")
