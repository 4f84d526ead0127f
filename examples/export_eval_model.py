"""After training with syncbn: back to plain BatchNorm, then export the eval model.

    python examples/export_eval_model.py --checkpoint digits-syncbn.pt --out digits.pt2

``syncbn.revert_sync_batchnorm`` swaps every ``syncbn.SyncBatchNorm`` for the
``torch.nn.BatchNorm2d`` it replaced, sharing the trained weights and running
statistics. The result is ordinary PyTorch with no tie to torch.distributed, so
``torch.export`` captures it as a graph of standard ATen ops (``batch_norm``
with the running statistics) that runs anywhere, here reloaded and checked
against the eager model on the test split. (``torch.jit.trace`` also works
but is deprecated in torch 2.13.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from digits import accuracy, build_model, load_digits

import syncbn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="digits-syncbn.pt",
                        help="weights saved by ddp_train.py")
    parser.add_argument("--out", default="digits.pt2", help="the exported program")
    parser.add_argument("--seed", type=int, default=0, help="the seed ddp_train.py split with")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"no checkpoint at {args.checkpoint}: run examples/ddp_train.py first")

    # The training architecture, with its trained state (as a training script would rebuild it).
    model = syncbn.convert_sync_batchnorm(build_model())
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))

    plain = syncbn.revert_sync_batchnorm(model).eval()  # SyncBatchNorm -> BatchNorm2d
    kinds = sorted({type(m).__name__ for m in plain.modules() if "Norm" in type(m).__name__})
    print(f"normalization layers after revert: {', '.join(kinds)}")

    _, _, x_test, y_test = load_digits(args.seed)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(plain, (x_test[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, args.out)
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    print(f"exported {args.out}: {len(ops)} ops, "
          f"{sum('batch_norm' in op for op in ops)} of them batch_norm with running stats")

    reloaded = torch.export.load(args.out).module()
    with torch.no_grad():
        gap = float((reloaded(x_test) - plain(x_test)).abs().max())
    print(f"reloaded program vs eager model on {len(x_test)} test images: max |diff| {gap:.1e}")
    print(f"test accuracy: eager {accuracy(plain, x_test, y_test):.1%}, "
          f"exported {float((reloaded(x_test).argmax(1) == y_test).float().mean()):.1%}")
    if gap > 1e-5:
        sys.exit("the exported program disagrees with the eager model")


if __name__ == "__main__":
    main()
