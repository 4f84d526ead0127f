"""The accelerate recipe on 2 CPU ranks (``debug_launcher``); every rank saves its result.

``python accelerate_parity.py OUT_DIR`` runs :func:`train` on 2 forked CPU ranks
(gloo) and writes ``OUT_DIR/rank{r}.pt``: the reverted model's state dict and its
BatchNorm classes. ``test_accelerate.py`` compares with the oracle.

The recipe: convert before ``prepare``, so the DDP wrapper accelerate builds sees
syncbn's layers; revert after ``unwrap_model`` to get plain BatchNorm back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import trainer_helpers as th
from accelerate import Accelerator, debug_launcher
from torch.utils.data import DataLoader

import syncbn

DTYPE = torch.float64
EPOCHS = 2


def train(out_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == th.WORLD_SIZE, accelerator.num_processes
    net = syncbn.convert_sync_batchnorm(th.build_net(DTYPE))  # before prepare
    optimizer = torch.optim.SGD(net.parameters(), lr=th.LR)
    # accelerate shards the loader: rank r gets batches r, r + 2, ... of this order
    loader = DataLoader(th.dataset(DTYPE), batch_size=th.PER_RANK, shuffle=False)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    classes_in_training = th.batchnorm_classes(net)
    net.train()
    for _ in range(EPOCHS):
        for images, labels in loader:
            optimizer.zero_grad()
            accelerator.backward(th.loss_of(net, images, labels))
            optimizer.step()
    plain = syncbn.revert_sync_batchnorm(accelerator.unwrap_model(net))
    torch.save({
        "state": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()},
        "classes_in_training": classes_in_training,
        "classes_after": th.batchnorm_classes(plain),
    }, Path(out_dir) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    debug_launcher(train, args=(sys.argv[1],), num_processes=th.WORLD_SIZE)
