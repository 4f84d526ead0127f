"""``torch.export`` (strict) of a converted model in eval mode, with no process group.

Out of training syncbn's layer is plain BatchNorm with the running statistics, so the
exported program must hold ``aten.batch_norm`` and nothing from torch.distributed, and
compute what eager BatchNorm computes. Strict export traces with Dynamo, which reports
any attribute that forward writes on a module as a side effect (a warning, an error
under this suite's filterwarnings): the test records and rejects them.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

import syncbn


def _trained_net() -> nn.Sequential:
    """A net with BatchNorm2d and BatchNorm1d whose running statistics are not the defaults."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 6), nn.BatchNorm1d(6),
    )
    net(torch.randn(8, 3, 6, 6) + 2.0)  # one training forward: updates the running stats
    return net



def test_strict_export_of_converted_eval_model_without_process_group() -> None:
    assert not dist.is_initialized()
    plain = _trained_net().eval()
    x = torch.randn(2, 3, 6, 6) + 2.0
    expected = plain(x)
    model = syncbn.convert_sync_batchnorm(plain).eval()
    assert [type(m) for m in model if "BatchNorm" in type(m).__name__] == [syncbn.SyncBatchNorm] * 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (x,), strict=True)
    # torch's notice about the interpreter (Python 3.13.0: "Consider upgrading to Python
    # 3.13.1+"), not about the model, is not a side effect
    warned = [str(w.message) for w in caught]
    warned = [text for text in warned if "Consider upgrading to Python" not in text]
    assert not warned, "strict export warned (side effects?)"

    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("aten.batch_norm.default") + targets.count(
        "aten._native_batch_norm_legit_no_training.default") == 2, targets
    assert not [t for t in targets if "c10d" in t or "dist" in t], targets
    torch.testing.assert_close(program.module()(x), expected, atol=1e-6, rtol=1e-6)
