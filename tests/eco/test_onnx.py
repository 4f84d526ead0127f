"""ONNX export of a reverted model, run by onnx's reference evaluator against torch.

The way to ONNX: convert for training, ``syncbn.revert_sync_batchnorm`` the trained
model (plain BatchNorm1d/2d, the same parameters and buffers), export that. Uses
``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``.
"""

from __future__ import annotations

import pytest
import torch
import trainer_helpers as th

import syncbn

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'syncbn[onnx]'")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript: "
                    "pip install 'syncbn[onnx]'")
from onnx.reference import ReferenceEvaluator  # noqa: E402  (after the skip)


def test_reverted_model_exports_to_onnx_and_runs_like_torch() -> None:
    data = th.dataset()
    model = syncbn.convert_sync_batchnorm(th.build_net())
    model(data.tensors[0][:8])  # training forward without a group: running stats move
    plain = syncbn.revert_sync_batchnorm(model).eval()
    assert th.batchnorm_classes(plain) == ["BatchNorm2d", "BatchNorm1d"]
    x = data.tensors[0][8:12]
    with torch.no_grad():
        expected = plain(x).numpy()

    program = torch.onnx.export(plain, (x,), dynamo=True, verbose=False)
    assert program is not None
    proto = program.model_proto
    onnx.checker.check_model(proto)
    (got,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    assert got.shape == expected.shape
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected),
                               atol=1e-5, rtol=1e-5)
    # the running statistics are in the graph: the same model on other stats differs
    with torch.no_grad():
        plain[1].running_mean += 1.0
    assert not torch.allclose(torch.from_numpy(got), plain(x))
