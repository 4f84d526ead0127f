"""Train the helpers' net with Lightning on 2 CPU ranks and syncbn's plugin; save what happened.

``python lightning_parity.py STRATEGY OUT_DIR`` (STRATEGY: ddp, ddp_spawn or ddp_fork)
writes ``OUT_DIR/rank{r}.pt`` from every rank at the end of ``fit`` (after Lightning's
teardown, so after the plugin's ``revert``) and ``OUT_DIR/main.pt`` from the launching
process after ``fit`` returns: the state dict, the BatchNorm classes during training and
after, and the world size. ``test_lightning.py`` runs it and compares with the oracle.

A script, not a test function: ``strategy="ddp"`` starts the other ranks by running
this very command again (Lightning's subprocess launcher); ``ddp_spawn`` re-imports it
as ``__mp_main__`` in each rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import trainer_helpers as th
from torch import Tensor, nn
from torch.utils.data import DataLoader

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]

from syncbn.integrations.lightning import SyncBatchNormPlugin

DTYPE = torch.float64
EPOCHS = 2


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = th.build_net(DTYPE)
        self.classes_in_training: list[str] = []

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def train_dataloader(self) -> DataLoader[Any]:
        data = th.dataset(DTYPE)
        sampler = th.rank_sampler(data, self.trainer.global_rank)
        assert self.trainer.world_size == th.WORLD_SIZE, self.trainer.world_size
        return DataLoader(data, batch_size=th.PER_RANK, sampler=sampler)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if not self.classes_in_training:
            self.classes_in_training = th.batchnorm_classes(self.net)
        return th.loss_of(self.net, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=th.LR)

    def on_fit_end(self) -> None:  # after the strategy's teardown: the plugin has reverted
        save(self.net, self.classes_in_training,
             OUT / f"rank{self.trainer.global_rank}.pt", self.trainer.world_size)


def save(net: nn.Module, classes_in_training: list[str], path: Path, world_size: int) -> None:
    torch.save({
        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "classes_in_training": classes_in_training,
        "classes_after": th.batchnorm_classes(net),
        "world_size": world_size,
    }, path)


OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")


def main(strategy: str) -> None:
    torch.set_num_threads(1)
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=th.WORLD_SIZE, strategy=strategy, precision="64-true",
        plugins=[SyncBatchNormPlugin()], sync_batchnorm=True, use_distributed_sampler=False,
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module)
    if trainer.global_rank == 0:
        save(module.net, module.classes_in_training, OUT / "main.pt", trainer.world_size)


if __name__ == "__main__":
    main(sys.argv[1])
