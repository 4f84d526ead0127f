"""Lightning with syncbn's plugin: 2 CPU ranks equal one process on the global batch.

Real Lightning (``lightning.pytorch`` or ``pytorch_lightning``), gloo on 127.0.0.1,
``precision="64-true"``. Each strategy runs ``lightning_parity.py`` in a fresh Python
(``ddp`` re-runs its command for the other rank; a fresh process also keeps Lightning's
environment variables out of this one), killed with all its ranks if it overruns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trainer_helpers as th

pytest.importorskip("lightning", reason="needs lightning: pip install 'syncbn[lightning]'")

SCRIPT = th.HERE / "lightning_parity.py"
TIMEOUT_S = 240.0  # a shared 2-core machine: ddp_spawn imports Lightning in 3 processes


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    data = th.dataset(torch.float64)
    net = th.train_reference(th.build_net(torch.float64), data, th.global_batches(data, epochs=2))
    return net.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp"])
def test_plugin_matches_one_process_on_the_global_batch(
    strategy: str, reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    th.run_script([str(SCRIPT), strategy, str(tmp_path)], timeout_s=TIMEOUT_S,
                  env=th.loopback_env())
    untrained = th.build_net(torch.float64).state_dict()
    for name in ("rank0", "rank1", "main"):
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert saved["world_size"] == th.WORLD_SIZE
        # trained with syncbn's layer, and the user's classes are back after fit
        if name != "main" or strategy == "ddp":  # ddp_spawn/fork: main never converts
            assert saved["classes_in_training"] == ["SyncBatchNorm", "SyncBatchNorm"], name
        assert saved["classes_after"] == ["BatchNorm2d", "BatchNorm1d"], name
        th.assert_same_state(saved["state"], reference, atol=1e-12, rtol=1e-10,
                             label=f"{strategy} {name}")
        assert not torch.equal(saved["state"]["0.weight"], untrained["0.weight"])


def test_plugin_is_accepted_with_sync_batchnorm_true_and_reverts_what_it_converted() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    import syncbn
    from syncbn.integrations.lightning import SyncBatchNormPlugin

    plugin = SyncBatchNormPlugin()
    assert isinstance(plugin, TorchSyncBatchNorm)
    trainer = Trainer(accelerator="cpu", devices=1, plugins=[plugin], sync_batchnorm=True,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer._accelerator_connector._layer_sync is plugin

    own = syncbn.SyncBatchNorm(3)  # built with syncbn: stays syncbn after revert
    model = torch.nn.Sequential(torch.nn.BatchNorm3d(3), own, torch.nn.BatchNorm1d(3))
    weight = model[0].weight
    converted = plugin.apply(model)
    assert converted is model
    assert [type(m) for m in model] == [syncbn.SyncBatchNorm] * 3
    assert model[1] is own and model[0].weight is weight
    reverted = plugin.revert(model)
    assert reverted is model
    assert [type(m) for m in model] == [torch.nn.BatchNorm3d, syncbn.SyncBatchNorm,
                                        torch.nn.BatchNorm1d]
    assert model[1] is own and model[0].weight is weight


def test_plugin_is_accepted_by_pytorch_lightning_too() -> None:
    pl_layer_sync = pytest.importorskip("pytorch_lightning.plugins.layer_sync")
    from syncbn.integrations.lightning import SyncBatchNormPlugin

    assert isinstance(SyncBatchNormPlugin(), pl_layer_sync.TorchSyncBatchNorm)


def test_import_syncbn_does_not_import_lightning() -> None:
    code = ("import sys, syncbn, syncbn.cli, syncbn.integrations\n"
            "assert not {'lightning', 'pytorch_lightning', 'syncbn.integrations.lightning'} & "
            "set(sys.modules), sorted(m for m in sys.modules if 'lightning' in m)\n")
    th.run_script(["-c", code], timeout_s=60, env=th.loopback_env())
