"""Train with DDP and synchronized BatchNorm: ``syncbn.convert_sync_batchnorm`` in one line.

    torchrun --nproc-per-node 4 examples/ddp_train.py --epochs 3 --out digits-syncbn.pt
    python examples/ddp_train.py                       # a group of one process works too

Each rank sees only ``--batch-per-rank`` images per step (default 4). With plain
``BatchNorm2d`` every rank would normalize with the statistics of its own 4
images; after ``convert_sync_batchnorm`` every BatchNorm uses the statistics of
the whole global batch (``world_size × 4`` images), on CPU with gloo as on GPUs
with NCCL. Rank 0 saves the trained weights; ``export_eval_model.py`` turns
them into a plain-PyTorch inference model.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits import accuracy, build_model, load_digits, rank_loader, setup_distributed
from torch.nn.parallel import DistributedDataParallel

import syncbn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="digits-syncbn.pt", help="where rank 0 saves the weights")
    args = parser.parse_args()

    rank, world_size, device = setup_distributed()
    x_train, y_train, x_test, y_test = load_digits(args.seed)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP broadcasts rank 0's too)
    model = build_model()
    model = syncbn.convert_sync_batchnorm(model)  # every BatchNorm2d -> syncbn.SyncBatchNorm
    model = DistributedDataParallel(
        model.to(device), device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    # each rank takes its own slice of every epoch's shuffled training set
    loader, sampler = rank_loader(x_train, y_train, args.batch_per_rank, world_size, rank,
                                  args.seed)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=device)  # loss sum, steps
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()  # syncbn's backward all-reduces its statistics' gradients
            optimizer.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        dist.all_reduce(total)  # (2,) -> (2,): sums over ranks
        if rank == 0:
            test_acc = accuracy(model.module, x_test.to(device), y_test.to(device))
            print(f"epoch {epoch + 1}: train loss {total[0] / total[1]:.4f}, "
                  f"test accuracy {test_acc:.1%} "
                  f"({world_size} ranks × {args.batch_per_rank} = global batch "
                  f"{world_size * args.batch_per_rank})", flush=True)

    if rank == 0:
        # The state_dict keys are those of the BatchNorm2d model (weight, bias,
        # running_mean, running_var, num_batches_tracked): it loads into either.
        torch.save(model.module.state_dict(), args.out)
        print(f"saved {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
