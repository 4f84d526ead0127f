"""The same training with the Paddle flavour: Paddle's layer names, arguments and conventions.

    torchrun --nproc-per-node 4 examples/paddle_flavour.py --epochs 3
    python examples/paddle_flavour.py                    # a group of one process works too

Written as a Paddle user would: ``BatchNorm2D(C, momentum=0.9, epsilon=1e-5)``
(Paddle's momentum is the share of the *old* running value: 0.9 here is torch's
0.1), then ``SyncBatchNorm.convert_sync_batchnorm(model)`` as in
``paddle.nn.SyncBatchNorm``; the buffers are Paddle's ``_mean`` / ``_variance``
(with the biased batch variance, as Paddle keeps it), so a Paddle state dict
loads with ``load_state_dict``. Underneath it is PyTorch + torch.distributed.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits import accuracy, load_digits, rank_loader, setup_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncbn import paddle_compat as pnn


def build_paddle_style_model() -> nn.Sequential:
    """The CNN of ddp_train.py with Paddle-signature BatchNorm2D layers: (N, 1, 8, 8) -> (N, 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        pnn.BatchNorm2D(16, momentum=0.9, epsilon=1e-5, data_format="NCHW"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        # a Paddle ParamAttr: this layer's scale and shift learn at half the rate
        pnn.BatchNorm2D(32, weight_attr=pnn.ParamAttr(learning_rate=0.5),
                        bias_attr=pnn.ParamAttr(learning_rate=0.5)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rank, world_size, device = setup_distributed()
    x_train, y_train, x_test, y_test = load_digits(args.seed)

    torch.manual_seed(args.seed)
    model = build_paddle_style_model()
    model = pnn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm2D -> SyncBatchNorm
    model = DistributedDataParallel(
        model.to(device), device_ids=[device.index] if device.type == "cuda" else None
    )
    # one optimizer group per (learning_rate, regularizer) the ParamAttrs ask for
    groups = pnn.optimizer_param_groups(model.module, base_lr=args.lr)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)

    loader, sampler = rank_loader(x_train, y_train, args.batch_per_rank, world_size, rank,
                                  args.seed)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if rank == 0:
            test_acc = accuracy(model.module, x_test.to(device), y_test.to(device))
            print(f"epoch {epoch + 1}: last loss {loss.item():.4f}, test accuracy {test_acc:.1%}",
                  flush=True)

    if rank == 0:
        keys = [k for k in model.module.state_dict() if k.startswith("1.")]
        print(f"first norm layer: {type(model.module[1]).__name__}, state_dict keys {keys}")
        print(f"learning rates by group: {[g['lr'] for g in optimizer.param_groups]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
