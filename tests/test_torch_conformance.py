"""torch's own SyncBatchNorm tests, ported to CPU/gloo with syncbn for torch.nn.SyncBatchNorm.

Every test below names the upstream test it ports. The sources:

- ``torch/testing/_internal/distributed/distributed_test.py`` (``DistributedTest._DistTestBase``):
  every test whose name contains ``SyncBatchNorm`` or ``sync_bn``, plus ``test_ddp_inference``
  (it runs a SyncBatchNorm too). torch runs them on GPUs; here each rank is a CPU process of a
  3-rank gloo group (torch's own world size for gloo), and the models, inputs, steps,
  assertions and tolerances are torch's. ``self.assertEqual`` on tensors is
  ``torch.testing.assert_close`` with its dtype defaults.
- ``test/distributed/test_c10d_common.py`` (``CommonDistributedDataParallelTest``): the two
  empty-input SyncBatchNorm tests, on 2 ranks as there.
- ``test/test_nn.py`` (``TestNN``): the conversion test, the non-contiguous test's
  SyncBatchNorm variant, and the two tests of the CUDA kernels torch's SyncBatchNorm is built
  from, ported to what they check of the layer.
- ``test/quantization/eager/test_quantize_eager_qat.py`` (``TestQuantizeEagerQAT``): the two
  QAT tests that convert to SyncBatchNorm.

What torch checks with ``isinstance(m, nn.SyncBatchNorm)`` is checked with
``isinstance(m, syncbn.SyncBatchNorm)`` (syncbn's layer cannot be torch's class: DDP refuses
CPU modules that hold it). Where the port differs from the original beyond that, the test's
docstring says how and why.

The multi-rank checks of one world size run as one task on the harness's pooled ranks (one
spawn per world size for the whole module); each check reports per rank, and the test of the
same name fails with the ranks' tracebacks. After a failing check the rest of its batch does
not run (the ranks may be out of step), and their tests say which check failed first.
The module also holds the tests of issue 20's non-member fix (conversion on ranks outside the
group), which share the 3-rank batch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817 (torch's idiom)

import harness
import syncbn
from syncbn import paddle_compat as pnn

OK = "ok"
BATCH_TIMEOUT_S = 120.0
"""One task runs a whole batch (about 15 s); a single collective fails within gloo's 20 s."""

# --- the batch runner -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Check:
    fn: Callable[[], None]
    world_size: int


_CHECKS: dict[str, _Check] = {}


def _on_ranks(world_size: int) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a check to run on every rank of the ``world_size`` batch."""
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        _CHECKS[fn.__name__] = _Check(fn, world_size)
        return fn
    return register


def _run_checks(names: list[str]) -> dict[str, list[str]]:
    """On every rank: run the checks in order; each one's status on every rank, by name."""
    world = dist.get_world_size()
    results: dict[str, list[str]] = {}
    for index, name in enumerate(names):
        torch.manual_seed(0)  # every rank draws the same numbers, as torch's tests rely on
        try:
            _CHECKS[name].fn()
            status = OK
        except Exception:
            status = traceback.format_exc()
        statuses: list[Any] = [None] * world
        try:
            dist.all_gather_object(statuses, status)
        except Exception as error:  # the group broke during the check: say which check
            raise RuntimeError(f"{name} left the group unusable; its status here: {status}"
                               ) from error
        results[name] = [str(s) for s in statuses]
        if any(s != OK for s in statuses):
            for rest in names[index + 1:]:
                results[rest] = [f"not run: {name} failed first in this batch"] * world
            break
    return results


_BATCHES: dict[int, dict[str, list[str]] | BaseException] = {}


def _selected(request: pytest.FixtureRequest, world_size: int) -> list[str]:
    """The checks of ``world_size`` whose tests this session runs (so ``-k`` runs fewer)."""
    wanted = {getattr(getattr(item, "function", None), "conformance_check", None)
              for item in request.session.items}
    return [n for n, c in _CHECKS.items() if c.world_size == world_size and n in wanted]


def _runs(check: Callable[[], None]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a test as the verdict of ``check``."""
    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.conformance_check = check.__name__  # type: ignore[attr-defined]
        return test
    return mark


def _verdict(check: Callable[[], None], request: pytest.FixtureRequest) -> None:
    """Fail with the ranks' tracebacks unless ``check`` passed on every rank of its batch."""
    world_size = _CHECKS[check.__name__].world_size
    if world_size not in _BATCHES:
        names = _selected(request, world_size)
        try:
            _BATCHES[world_size] = harness.run_ranks(
                world_size, _run_checks, names, timeout=BATCH_TIMEOUT_S)[0]
        except (harness.RankError, harness.RankTimeoutError) as error:
            _BATCHES[world_size] = error
    batch = _BATCHES[world_size]
    if isinstance(batch, BaseException):
        raise batch
    failed = {r: s for r, s in enumerate(batch[check.__name__]) if s != OK}
    if failed:
        text = "\n".join(f"--- rank {r} ---\n{s}" for r, s in failed.items())
        pytest.fail(f"{check.__name__} failed on ranks {sorted(failed)}:\n{text}", pytrace=False)


# --- torch's helpers, in our words ----------------------------------------------------------


class BatchNormNet(nn.Module):
    """torch's ``BatchNormNet``: Linear 2→40, viewed (N, 4, 10), BatchNorm1d(4), Linear 40→4."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 40, bias=False)
        self.bn = nn.BatchNorm1d(4, affine=affine)
        self.fc2 = nn.Linear(40, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.reshape(self.fc1(x), (-1, 4, 10))
        x = self.bn(x)
        x = torch.reshape(x, (-1, 40))
        return F.softmax(self.fc2(x), dim=1)


class _FC2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 50, bias=True)
        self.fc.bias.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


class Net(nn.Module):
    """torch's ``Net`` (the plain DDP model of ``test_ddp_inference``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 10, bias=False)
        self.fc2 = _FC2()
        self.fc3 = nn.Linear(50, 4, bias=False)
        self.relu = nn.ReLU()
        self.no_grad_param = nn.Parameter(torch.tensor([2, 2]).long(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return F.softmax(self.fc3(x), dim=1)


def _assert_equal(actual: Any, expected: Any, **tolerances: float) -> None:
    """``self.assertEqual`` on tensors: assert_close with the dtype's default tolerances."""
    torch.testing.assert_close(actual, expected, **tolerances)


def _save_load(model: nn.Module) -> nn.Module:
    """torch's tests ``torch.save`` the DDP model and load it back (``weights_only=False``)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, weights_only=False)
    return loaded


def _ddp_helper(model: nn.Module, x: torch.Tensor, target: torch.Tensor, scale: float = 1.0,
                memory_format: torch.memory_format | None = None) -> None:
    """torch's ``_test_DDP_helper``: one training forward and backward of the MSE loss."""
    model.train()
    output = model(x)
    (F.mse_loss(output, target) * scale).backward()
    if memory_format is not None:
        assert output.is_contiguous(memory_format=memory_format)


def _model_step(model: nn.Module, zero_grad: bool) -> None:
    """torch's ``_model_step`` (``p += grad``, grad dropped) or ``_model_step_with_zero_grad``."""
    for param in model.parameters():
        if param.grad is not None:
            with torch.no_grad():
                param += param.grad
            if zero_grad:
                param.grad.requires_grad_(False)
                param.grad.zero_()
            else:
                param.grad = None


def _ddp_niter(base: nn.Module, model_ddp: nn.Module, x: torch.Tensor, target: torch.Tensor,
               local_bs: int, batch_size: int, offset: int | None = None, world_size: int = 0,
               zero_grad: bool = False, memory_format: torch.memory_format | None = None,
               n_iter: int = 5) -> None:
    """torch's ``_test_DDP_niter`` with ``test_save=True``: the single-process ``base`` on the
    whole batch and the DDP model on this rank's slice must keep equal parameters."""
    rank = dist.get_rank()
    for idx in range(n_iter):
        _ddp_helper(base, x, target, memory_format=memory_format)
        if offset is None:
            offset = rank * local_bs
        scale = world_size * local_bs / batch_size if world_size != 0 else 1.0
        _ddp_helper(model_ddp, x[offset:offset + local_bs], target[offset:offset + local_bs],
                    scale, memory_format=memory_format)
        _model_step(base, zero_grad)
        _model_step(model_ddp, zero_grad)
        base_params = list(base.parameters())
        ddp_params = list(model_ddp.module.parameters())
        assert len(base_params) == len(ddp_params)
        for mine, theirs in zip(base_params, ddp_params, strict=True):
            _assert_equal(mine, theirs)
        x = x[torch.randperm(batch_size)]  # the same permutation on every rank (same seed)
        if idx == 2:  # save the model in the middle and reload
            model_ddp = _save_load(model_ddp)
    saved = _save_load(model_ddp)
    for key, value in model_ddp.state_dict().items():
        _assert_equal(value, saved.state_dict()[key])


def _ddp_sync_batch_norm(local_bs: int, global_bs: int, offset: int,
                         affine: bool = True) -> None:
    """torch's ``_test_DistributedDataParallel_SyncBatchNorm`` on CPU (no ``device_ids``)."""
    model = BatchNormNet(affine=affine)
    base = copy.deepcopy(model)
    model_ddp: nn.Module = DDP(syncbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    model_ddp = _save_load(model_ddp)  # serializable before training too
    x = torch.randn(global_bs, 2)
    target = torch.randn(global_bs, 4)
    # torch passes 5 or 2 where _test_DDP_niter takes zero_grad: both are true
    _ddp_niter(base, model_ddp, x, target, local_bs, global_bs, offset, dist.get_world_size(),
               zero_grad=True)
    dist.barrier()


def _validate_net_equivalence(net: nn.Module) -> None:
    """torch's ``validate_net_equivalence``: every state tensor is equal on every rank."""
    for tensor in net.module.state_dict().values():
        gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        for other in gathered:
            _assert_equal(other, tensor)


# --- distributed_test.py: DDP with SyncBatchNorm (3 ranks) ----------------------------------


@_on_ranks(3)
def _ddp_sync_batch_norm_default() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    _ddp_sync_batch_norm(local_bs=2, global_bs=world * 2, offset=rank * 2)


@_runs(_ddp_sync_batch_norm_default)
def test_ddp_sync_batch_norm(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm``: BatchNormNet converted and wrapped
    in DDP (saved and reloaded before training and at step 3) keeps the parameters of the
    single-process model on the whole batch, 5 steps.

    torch repeats the run with ``output_device=torch.device("cuda")`` and with
    ``device_ids=[torch.device("cuda:r")]``; DDP accepts neither for a CPU module (both must be
    None there), so the port runs the first of the three runs only.
    """
    _verdict(_ddp_sync_batch_norm_default, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_no_affine() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    _ddp_sync_batch_norm(local_bs=2, global_bs=world * 2, offset=rank * 2, affine=False)


@_runs(_ddp_sync_batch_norm_no_affine)
def test_ddp_sync_batch_norm_no_affine(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_No_Affine``."""
    _verdict(_ddp_sync_batch_norm_no_affine, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_2d_input() -> None:
    model = nn.BatchNorm1d(2)
    base = copy.deepcopy(model)
    model_ddp = DDP(syncbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    local_bs = 2
    global_bs = dist.get_world_size() * local_bs
    x = torch.randn(global_bs, 2)
    target = torch.randn(global_bs, 2)
    _ddp_niter(base, model_ddp, x, target, local_bs, global_bs)
    dist.barrier()


@_runs(_ddp_sync_batch_norm_2d_input)
def test_ddp_sync_batch_norm_2d_input(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_2D_Input`` (torch disables cuDNN
    there; there is no cuDNN on CPU)."""
    _verdict(_ddp_sync_batch_norm_2d_input, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_single_input_per_process() -> None:
    model = nn.BatchNorm1d(2)
    base = copy.deepcopy(model)
    model_ddp = DDP(syncbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    local_bs = 1
    global_bs = dist.get_world_size()
    x = torch.randn(global_bs, 2)
    target = torch.randn(global_bs, 2)
    _ddp_niter(base, model_ddp, x, target, local_bs, global_bs)
    dist.barrier()


@_runs(_ddp_sync_batch_norm_single_input_per_process)
def test_ddp_sync_batch_norm_single_input_per_process(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_Single_Input_Per_Process``: one
    sample per rank, statistics of the 3 samples."""
    _verdict(_ddp_sync_batch_norm_single_input_per_process, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_diff_input_sizes_running_value() -> None:
    layer = syncbn.SyncBatchNorm(2, momentum=0.99)
    model = DDP(layer)
    rank = dist.get_rank()
    inputs = [torch.cat([torch.ones(2, 1, 10 ** (i + 1)) * (0.1 ** (i - 1)),
                         torch.ones(2, 1, 10 ** (i + 1)) * (0.3 ** (i - 1))], dim=1)
              for i in range(dist.get_world_size())]
    all_inputs = torch.cat([x.permute(1, 0, 2).reshape(layer.num_features, -1)
                            for x in inputs], dim=1)
    for _ in range(100):
        y = model(inputs[rank])
        y.mean().backward()
    running_mean, running_var = model.module.running_mean, model.module.running_var
    torch.testing.assert_close(running_mean, all_inputs.mean(1))
    torch.testing.assert_close(running_var, all_inputs.var(1))


@_runs(_ddp_sync_batch_norm_diff_input_sizes_running_value)
def test_ddp_sync_batch_norm_diff_input_sizes_running_value(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value``:
    ranks of 20, 200 and 2000 values per channel; after 100 steps at momentum 0.99 the
    running statistics are those of all 2220."""
    _verdict(_ddp_sync_batch_norm_diff_input_sizes_running_value, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_diff_input_sizes_gradient() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    _ddp_sync_batch_norm(local_bs=rank + 2, global_bs=(world + 3) * world // 2,
                         offset=(rank + 3) * rank // 2)


@_runs(_ddp_sync_batch_norm_diff_input_sizes_gradient)
def test_ddp_sync_batch_norm_diff_input_sizes_gradient(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_gradient``: ranks
    of 2, 3 and 4 samples train as the single model on all 9."""
    _verdict(_ddp_sync_batch_norm_diff_input_sizes_gradient, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_half() -> None:
    model = BatchNormNet().half()
    model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_ddp = DDP(model)
    out = model_ddp(torch.randn(2, 2, dtype=torch.float16))
    assert out.dtype == torch.float16
    out.sum().backward()
    for param in model_ddp.parameters():
        assert param.grad is not None and param.grad.dtype == torch.float16


@_runs(_ddp_sync_batch_norm_half)
def test_ddp_sync_batch_norm_half(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_half``: a float16 model trains
    without dtype mismatch, float16 output and gradients."""
    _verdict(_ddp_sync_batch_norm_half, request)


@_on_ranks(3)
def _ddp_sync_batch_norm_channels_last() -> None:
    for memory_format in (torch.channels_last, torch.channels_last_3d):
        torch.manual_seed(0)
        rank, world = dist.get_rank(), dist.get_world_size()
        local_bs, global_bs = 2, world * 2
        model = syncbn.SyncBatchNorm(2, momentum=0.99)
        base = copy.deepcopy(model)
        shape = [global_bs, 2, 4, 4] + ([] if memory_format is torch.channels_last else [4])
        x = torch.randn(*shape, dtype=torch.float).to(memory_format=memory_format)
        target = torch.randn(*shape, dtype=torch.float).to(memory_format=memory_format)
        # as torch's: the baseline is the very module the DDP model wraps
        _ddp_niter(base, DDP(base), x, target, local_bs, global_bs, rank * 2, world,
                   memory_format=memory_format)
        dist.barrier()


@_runs(_ddp_sync_batch_norm_channels_last)
def test_ddp_sync_batch_norm_channels_last(request: pytest.FixtureRequest) -> None:
    """Ports ``test_DistributedDataParallel_SyncBatchNorm_Channels_Last``: channels_last and
    channels_last_3d inputs, outputs in the same memory format, parameters as the baseline's."""
    _verdict(_ddp_sync_batch_norm_channels_last, request)


class _Bottleneck(nn.Module):
    """The nesting of torchvision's ResNet-50 bottleneck: bn1..bn3 and a downsample branch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                        nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.downsample(x))


class _ResNetLike(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(_Bottleneck(channels), _Bottleneck(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return out


@_on_ranks(3)
def _sync_batch_norm_process_group() -> None:
    process_group = dist.new_group([0])  # on ranks 1 and 2: the non-member placeholder
    model = _ResNetLike()
    model_sync = syncbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model), process_group)
    assert model_sync.layer1[0].bn1.process_group == process_group
    # beyond torch's check: every nested layer took the group, at every depth
    layers = [m for m in model_sync.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert len(layers) == 1 + 2 * 4
    assert all(m.process_group == process_group for m in layers)


@_runs(_sync_batch_norm_process_group)
def test_sync_batch_norm_process_group(request: pytest.FixtureRequest) -> None:
    """Ports ``test_SyncBatchNorm_process_group``: ``convert_sync_batchnorm(model, group)``
    passes the group to layers nested in sub-sub-modules, on every rank, ranks outside the
    group (which hold ``new_group``'s placeholder) included.

    torch converts torchvision's ResNet-50 (skipped there without torchvision); the port
    converts a model of the same nesting (``layer1[0].bn1``, a ``downsample`` Sequential),
    so it runs without torchvision.
    """
    _verdict(_sync_batch_norm_process_group, request)


class _ModelWithComm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 40, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        dist.all_reduce(x)
        return x


def _train_joined(model: DDP, model_input: torch.Tensor, num_iters: int,
                  done: list[int]) -> None:
    with warnings.catch_warnings(), model.join(throw_on_early_termination=True):
        # the all_reduce in _ModelWithComm's forward has no autograd kernel, and torch
        # warns so (in the upstream test too)
        warnings.filterwarnings("ignore", message="c10d::allreduce_: an autograd kernel")
        for step in range(num_iters):
            loss = model(model_input).sum()
            loss.backward()
            _model_step(model, zero_grad=False)
            done.append(step)


@_on_ranks(3)
def _ddp_uneven_inputs_stop_iteration_sync_bn() -> None:
    rank = dist.get_rank()
    model_bn = syncbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(BatchNormNet()))
    comm_model = _ModelWithComm()
    model_input = torch.randn(10, 2)
    for module in (model_bn, comm_model):
        model = DDP(module)

        min_num_iters = 5
        if rank != 0:  # early termination ranks
            num_iters = min_num_iters
            error = f"Rank {rank} exhausted all inputs"
        else:
            num_iters = min_num_iters * 2
            error = "Detected at least one rank that exhausted inputs."
        done: list[int] = []
        with pytest.raises(RuntimeError, match=error):
            _train_joined(model, model_input, num_iters, done)
        assert len(done) == min_num_iters
        _validate_net_equivalence(model)


@_runs(_ddp_uneven_inputs_stop_iteration_sync_bn)
def test_ddp_uneven_inputs_stop_iteration_sync_bn(request: pytest.FixtureRequest) -> None:
    """Ports ``test_ddp_uneven_inputs_stop_iteration_sync_bn``: under
    ``DDP.join(throw_on_early_termination=True)`` a SyncBatchNorm model stops on every rank
    after the shortest rank's 5 steps with torch's errors, and the ranks stay equal."""
    _verdict(_ddp_uneven_inputs_stop_iteration_sync_bn, request)


def _collective_events(prof: Any, names: tuple[str, ...]) -> list[str]:
    return [e.name for e in prof.function_events if any(n in e.name for n in names)]


@_on_ranks(3)
def _ddp_sync_bn_training_vs_eval() -> None:
    model: nn.Module = DDP(syncbn.SyncBatchNorm(2, momentum=0.99, track_running_stats=False))
    with torch.autograd.profiler.profile() as prof:
        for _ in range(6):
            out = model(torch.randn(10, 2, 4, 4))
            out.sum().backward()
    # torch looks for its all_gather; syncbn's collective is an all_reduce (the custom op
    # syncbn::all_reduce in compiled code, c10d's all_reduce directly in eager code)
    assert _collective_events(prof, ("syncbn::all_reduce", "allreduce")) != []
    model_inference = model.module
    if dist.get_rank() == 0:  # only rank 0 runs: a synchronizing eval would hang or fail
        model_inference.eval()
        with torch.autograd.profiler.profile() as prof:
            for _ in range(6):
                out = model_inference(torch.randn(10, 2, 4, 4))
                out.sum().backward()
        assert _collective_events(prof, ("syncbn::", "gloo:", "all_gather", "all_reduce")) == []
    dist.barrier()


@_runs(_ddp_sync_bn_training_vs_eval)
def test_ddp_sync_bn_training_vs_eval(request: pytest.FixtureRequest) -> None:
    """Ports ``test_ddp_sync_bn_training_vs_eval`` (marked ``unittest.skip`` upstream as
    failing, pytorch#113620; it passes here): with ``track_running_stats=False`` training
    synchronizes (an all_reduce in the profile, where torch looks for its
    ``all_gather``) and eval on one rank alone communicates nothing."""
    _verdict(_ddp_sync_bn_training_vs_eval, request)


@_on_ranks(3)
def _sync_bn_logged() -> None:
    model = BatchNormNet()
    no_sync_bn = DDP(copy.deepcopy(model))
    assert not no_sync_bn._get_ddp_logging_data().get("has_sync_bn", True)
    model_ddp = DDP(syncbn.SyncBatchNorm.convert_sync_batchnorm(model))
    # torch asserts True here: DDP sets has_sync_bn from isinstance(m, nn.SyncBatchNorm),
    # which syncbn's layers are not (documented in the README's Compatibility section)
    assert not model_ddp._get_ddp_logging_data()["has_sync_bn"]
    assert any(isinstance(m, syncbn.SyncBatchNorm) for m in model_ddp.modules())


@_runs(_sync_bn_logged)
def test_sync_bn_logged(request: pytest.FixtureRequest) -> None:
    """Ports ``test_sync_bn_logged`` with its second assertion inverted, as the API contract
    says: DDP's ``has_sync_bn`` logging field is set by ``isinstance(m, nn.SyncBatchNorm)``,
    False for syncbn layers (they cannot subclass torch's class: DDP refuses CPU modules that
    hold it). The port asserts that, and that the layers are ``syncbn.SyncBatchNorm``."""
    _verdict(_sync_bn_logged, request)


@_on_ranks(3)
def _ddp_inference() -> None:
    model = Net()
    local_model = copy.deepcopy(model)
    model_ddp = DDP(model)
    syncbn_model = syncbn.SyncBatchNorm(2, momentum=0.99, track_running_stats=False)
    local_syncbn_model = copy.deepcopy(syncbn_model)
    syncbn_ddp = DDP(syncbn_model)
    inp = torch.randn(10, 2)
    inp_syncbn = torch.randn(10, 2, 4, 4)
    for test_model, test_local_model, test_inp in (
        (model_ddp, local_model, inp),
        (syncbn_ddp, local_syncbn_model, inp_syncbn),
    ):
        if dist.get_rank() == 0:
            test_model.eval()
            test_local_model.eval()
            for _ in range(6):
                _assert_equal(test_model(test_inp), test_local_model(test_inp))
    dist.barrier()  # only rank 0 ran inference: a hang would fail here


@_runs(_ddp_inference)
def test_ddp_inference(request: pytest.FixtureRequest) -> None:
    """Ports ``test_ddp_inference`` (its name has no "SyncBatchNorm", but it runs one): DDP
    in eval on rank 0 alone, a SyncBatchNorm without running statistics included, equals
    the local model and does not hang."""
    _verdict(_ddp_inference, request)


# --- issue 20: conversion on ranks outside the group (3 ranks, group [0, 1]) ----------------


def _double_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    with torch.no_grad():  # not the identity affine, so a wrong path would show
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


@_on_ranks(3)
def _non_member_conversion() -> None:
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    model = _double_model()
    converted = syncbn.convert_sync_batchnorm(copy.deepcopy(model), process_group=group)
    layer = converted[1]
    assert type(layer) is syncbn.SyncBatchNorm and layer.process_group == group
    sizes = (3, 2, 4)
    torch.manual_seed(1)
    data = torch.randn(sum(sizes), 3, 5, 5, dtype=torch.float64)
    start = sum(sizes[:rank])
    x = data[start:start + sizes[rank]]
    if rank == 2:
        assert group == dist.GroupMember.NON_GROUP_MEMBER
        repr(converted)
        before = copy.deepcopy(layer.state_dict())
        for candidate in (converted, copy.deepcopy(converted)):  # deepcopy keeps the placeholder
            assert candidate[1].process_group == group
            candidate.eval()
            assert torch.equal(candidate(x), model.eval()(x))  # running statistics, exactly
            candidate.train()
            with pytest.raises(ValueError, match=(
                    r"^SyncBatchNorm '1''s process_group does not include this rank "
                    r"\(global rank 2\)")):
                candidate(x)
            for key, value in candidate[1].state_dict().items():  # nothing was counted
                assert torch.equal(value, before[key]), key
        travelled = _save_load(converted)  # pickling drops the group, and says so on training
        assert travelled[1].process_group is None
        travelled.eval()
        assert torch.equal(travelled(x), model.eval()(x))
        travelled.train()
        with pytest.raises(ValueError, match=r"^SyncBatchNorm '1' was unpickled"):
            travelled(x)
        return
    # members: exactly BatchNorm on the batch of ranks 0 and 1
    oracle = copy.deepcopy(model).train()
    members = data[:sizes[0] + sizes[1]].clone().requires_grad_()
    expected = oracle(members)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    converted.train()
    x = x.clone().requires_grad_()
    out = converted(x)
    out.backward(grad_out[start:start + sizes[rank]])
    _assert_equal(out, expected[start:start + sizes[rank]])
    assert members.grad is not None and x.grad is not None
    _assert_equal(x.grad, members.grad[start:start + sizes[rank]])
    for name in ("weight", "bias"):
        grad = getattr(converted[1], name).grad
        grad_sum = [torch.zeros_like(grad) for _ in range(2)]
        dist.all_gather(grad_sum, grad, group=group)
        _assert_equal(grad_sum[0] + grad_sum[1], getattr(oracle[1], name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _assert_equal(getattr(converted[1], name), getattr(oracle[1], name))


@_runs(_non_member_conversion)
def test_non_member_rank_converts_and_refuses_only_training(request: pytest.FixtureRequest) -> None:
    """Issue 20: on a rank outside ``g = new_group([0, 1])`` (rank 2 of 3),
    ``convert_sync_batchnorm(model, process_group=g)`` converts (as torch does), the model and
    a deepcopy evaluate with the running statistics exactly, a training forward raises naming
    the layer and changes nothing, and a pickled copy evaluates too; ranks 0 and 1 train as
    BatchNorm on their joint batch (output, gradients, running statistics)."""
    _verdict(_non_member_conversion, request)


@_on_ranks(3)
def _non_member_constructors() -> None:
    group = dist.new_group([0, 1])
    rank = dist.get_rank()
    torch_layer = syncbn.SyncBatchNorm(4, process_group=group)
    paddle_layer = pnn.SyncBatchNorm(4, process_group=group)
    paddle_model = pnn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(pnn.BatchNorm2D(4)), process_group=group)
    assert isinstance(paddle_model[0], pnn.SyncBatchNorm)
    assert paddle_model[0].process_group is group
    repr(torch_layer)
    repr(paddle_model)
    x = torch.randn(3, 4, 2, 2)
    if rank != 2:
        return
    for layer in (torch_layer, paddle_layer, paddle_model):
        layer.eval()
        layer(x)
        copy.deepcopy(layer).eval()(x)
        layer.train()
    with pytest.raises(ValueError, match=r"^SyncBatchNorm\(4\)'s process_group does not include "
                                         r"this rank \(global rank 2\)"):
        torch_layer(x)
    with pytest.raises(ValueError, match=r"^SyncBatchNorm\(4\)'s process_group does not include"):
        paddle_layer(x)
    with pytest.raises(ValueError, match=r"^SyncBatchNorm '0''s process_group does not include"):
        paddle_model(x)


@_runs(_non_member_constructors)
def test_non_member_rank_builds_layers_of_both_flavours(request: pytest.FixtureRequest) -> None:
    """Issue 20: ``syncbn.SyncBatchNorm(C, process_group=placeholder)``, the Paddle flavour's
    constructor and its ``convert_sync_batchnorm`` accept ``new_group``'s placeholder; on the
    non-member rank eval runs and a training forward raises naming the layer."""
    _verdict(_non_member_constructors, request)


# --- test_c10d_common.py: empty inputs (2 ranks) --------------------------------------------


def _test_not_nan(model: nn.Module, x: torch.Tensor) -> None:
    y = model(x)
    assert not y.isnan().any().item()
    y.sum().backward()
    for param in model.parameters():
        assert param.grad is not None and not param.grad.isnan().any().item()


@_on_ranks(2)
def _sync_batch_norm_only_empty_input() -> None:
    rank = dist.get_rank()
    pg = dist.group.WORLD
    model: nn.Module = DDP(nn.Sequential(nn.BatchNorm2d(2)), process_group=pg)
    model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=pg)
    model.train()
    # only rank 0 receives empty inputs
    x = torch.zeros((1 if rank != 0 else 0, 2, 11, 13), dtype=torch.float32)
    x.requires_grad = True  # the backward pass communicates too
    _test_not_nan(model, x)
    x.requires_grad = False
    _test_not_nan(model, x)
    # all ranks receive empty inputs
    x = torch.zeros((0, 2, 11, 13), dtype=torch.float32)
    x.requires_grad = True
    _test_not_nan(model, x)
    x.requires_grad = False
    _test_not_nan(model, x)


@_runs(_sync_batch_norm_only_empty_input)
def test_sync_batch_norm_only_empty_input(request: pytest.FixtureRequest) -> None:
    """Ports ``test_sync_batch_norm_only_empty_input``: a DDP model converted afterwards, with
    an empty batch on rank 0, then on every rank, input requiring grad or not: no NaN in the
    output or the parameter gradients."""
    _verdict(_sync_batch_norm_only_empty_input, request)


@_on_ranks(2)
def _sync_batch_norm_empty_input() -> None:
    rank = dist.get_rank()
    pg = dist.group.WORLD
    model: nn.Module = DDP(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Linear(28, 2)),
                           process_group=pg)
    model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=pg)
    model.train()
    # only rank 0 receives empty inputs
    x = torch.zeros((3 if rank != 0 else 0, 2, 30, 30), dtype=torch.float32)
    _test_not_nan(model, x)
    # all ranks receive empty inputs
    x = torch.zeros((0, 2, 30, 30), dtype=torch.float32)
    _test_not_nan(model, x)


@_runs(_sync_batch_norm_empty_input)
def test_sync_batch_norm_empty_input(request: pytest.FixtureRequest) -> None:
    """Ports ``test_sync_batch_norm_empty_input``: Conv2d → BatchNorm2d → Linear, empty batch
    on rank 0, then on every rank: no NaN."""
    _verdict(_sync_batch_norm_empty_input, request)


# --- test_nn.py: the CUDA-kernel tests, ported to the layer (2 ranks) -----------------------


@_on_ranks(2)
def _sync_batchnorm_backward_elemt() -> None:
    rank = dist.get_rank()
    saved_input = torch.rand(2 * 2, 3, 2, 1)[2 * rank:2 * rank + 2]
    grad_output = torch.rand(2 * 2, 3, 2, 1)[2 * rank:2 * rank + 2]
    weight = torch.rand(3)

    def grad_input(grad_format: torch.memory_format,
                   input_format: torch.memory_format) -> torch.Tensor:
        layer = syncbn.SyncBatchNorm(3)
        with torch.no_grad():
            layer.weight.copy_(weight)
        x = saved_input.contiguous(memory_format=input_format).detach().requires_grad_()
        layer(x).backward(grad_output.contiguous(memory_format=grad_format))
        assert x.grad is not None
        return x.grad

    expected = grad_input(torch.contiguous_format, torch.contiguous_format)
    for a, b in [
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
        (torch.channels_last, torch.channels_last),
    ]:
        _assert_equal(grad_input(a, b), expected)


@_runs(_sync_batchnorm_backward_elemt)
def test_sync_batchnorm_backward_elemt(request: pytest.FixtureRequest) -> None:
    """Ports ``test_sync_batchnorm_backward_elemt`` to the layer: torch checks that its CUDA
    kernel ``torch.batch_norm_backward_elemt`` gives the same input gradient for contiguous
    and channels_last gradient/input in every combination (syncbn does not use that kernel).
    The port checks the same of syncbn's synchronized backward on 2 ranks, with torch's shapes
    (2, 3, 2, 1) per rank and a random weight."""
    _verdict(_sync_batchnorm_backward_elemt, request)


@_on_ranks(2)
def _sync_batchnorm_accuracy_cuda() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()

    def batch_norm_stats(data: torch.Tensor, memory_format: torch.memory_format,
                         mean_axes: tuple[int, ...]) -> None:
        mean_ref = torch.mean(data, mean_axes, keepdim=False)
        local = data[rank:rank + 1]
        for x in (local, local.to(memory_format=memory_format)):
            layer = syncbn.SyncBatchNorm(data.size(1), momentum=1.0)
            layer(x)  # momentum 1: the running mean is the global batch mean
            _assert_equal(layer.running_mean, mean_ref)

    batch_norm_stats(torch.randn(world, 96, 112, 112, dtype=torch.float), torch.channels_last,
                     (0, 2, 3))
    batch_norm_stats(torch.randn(world, 96, 28, 28, 28, dtype=torch.float),
                     torch.channels_last_3d, (0, 2, 3, 4))


@_runs(_sync_batchnorm_accuracy_cuda)
def test_sync_batchnorm_accuracy_cuda(request: pytest.FixtureRequest) -> None:
    """Ports ``test_sync_batchnorm_accuracy_cuda`` to the layer: torch checks that its CUDA
    kernel ``torch.batch_norm_stats`` computes ``torch.mean`` of contiguous and channels_last
    input (syncbn does not use that kernel). The port checks that syncbn's synchronized mean
    (the running mean at momentum 1) of one (1, 96, 112, 112) sample per rank, contiguous and
    channels_last, is ``torch.mean`` over both ranks' samples; the 5-D case runs at
    (1, 96, 28, 28, 28) per rank instead of 112³ (0.5 GB per input, too large for a CPU suite).
    """
    _verdict(_sync_batchnorm_accuracy_cuda, request)


# --- test_nn.py: single process ---------------------------------------------------------------


def test_convert_sync_batchnorm() -> None:
    """Ports ``TestNN.test_convert_sync_batchnorm`` on CPU (torch's runs on CUDA only):
    BatchNorm1d becomes the synchronized layer, InstanceNorm1d stays, every state tensor keeps
    its value and device."""
    module = nn.Sequential(nn.BatchNorm1d(100), nn.InstanceNorm1d(100))
    # an anchor for the comparison, in case the conversion changes the model in place
    comp_module = nn.Sequential(nn.BatchNorm1d(100), nn.InstanceNorm1d(100))
    comp_module.load_state_dict(module.state_dict())
    sync_bn_module = syncbn.SyncBatchNorm.convert_sync_batchnorm(module)
    children = list(sync_bn_module.children())
    assert children[0].__class__ is syncbn.SyncBatchNorm
    assert children[1].__class__ is nn.InstanceNorm1d
    for layer, converted_layer in zip(comp_module.children(), sync_bn_module.children(),
                                      strict=True):
        for key in layer.state_dict():
            assert layer.state_dict()[key].device == converted_layer.state_dict()[key].device
            _assert_equal(layer.state_dict()[key], converted_layer.state_dict()[key])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_batchnorm_non_contig_cpu(dtype: torch.dtype) -> None:
    """Ports ``TestNN.test_batchnorm_non_contig_cpu`` (its ``SyncBatchNorm`` subtest): a
    permuted, channels_last-strided input in eval gives BatchNorm2d's output in the
    channels_last format, and 16-bit input through a float32 layer gives the float32 result
    within 0.05."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = syncbn.SyncBatchNorm(2).float().eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_input = x.detach().clone().contiguous()
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(x)
    ref_out = ref_bn(ref_input)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    _assert_equal(out, ref_out)

    input_bf = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    input_f = input_bf.float()
    bn_mix = syncbn.SyncBatchNorm(2).float().eval()
    ref_bn_f = copy.deepcopy(bn_mix)
    out_bf = bn_mix(input_bf)
    ref_out_bf = ref_bn_f(input_f)
    _assert_equal(ref_out_bf, out_bf.float(), atol=0.05, rtol=0.05)


# --- test_quantize_eager_qat.py: single process ----------------------------------------------

_QUANTIZATION_WARNINGS = (
    # torch 2.13 deprecates torch.ao.quantization (moving to torchao); the tests use it as torch's
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
)


def _quantization() -> Any:
    import torch.ao.quantization as quantization

    return quantization


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """torch's ``override_quantized_engine`` (its module needs ``expecttest``)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@_QUANTIZATION_WARNINGS[0]
@_QUANTIZATION_WARNINGS[1]
def test_qat_convbn_fused_syncbn_replacement() -> None:
    """Ports ``test_qat_convbn_fused_syncbn_replacement``: in a fused, QAT-prepared Conv+BN
    (``torch.ao.nn.intrinsic.qat.ConvBn2d``) the conversion replaces the inner ``bn``. Beyond
    torch's check, the converted model runs a training forward."""
    quantization = _quantization()
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch's test needs the fbgemm quantized engine, absent from this build")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 1, 3, padding=1)
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bn(self.conv(x))
            return out

    with _quantized_engine("fbgemm"):
        fused_model = quantization.fuse_modules_qat(Model(), [["conv", "bn"]])
        fused_model.qconfig = quantization.get_default_qconfig("fbgemm")
        quantization.prepare_qat(fused_model, inplace=True)
        fused_model = syncbn.SyncBatchNorm.convert_sync_batchnorm(fused_model)
        assert isinstance(fused_model.conv.bn, syncbn.SyncBatchNorm), (
            "Expected BN to be converted to SyncBN")
        assert fused_model.train()(torch.randn(2, 4, 5, 5)).shape == (2, 1, 5, 5)


@_QUANTIZATION_WARNINGS[0]
def test_syncbn_preserves_qconfig() -> None:
    """Ports ``test_syncbn_preserves_qconfig``: an unfused BatchNorm's ``qconfig`` survives the
    conversion."""
    quantization = _quantization()
    m = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    m[1].qconfig = quantization.default_qconfig
    m = syncbn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert hasattr(m[1], "qconfig"), "missing qconfig after SyncBatchNorm conversion"
    assert m[1].qconfig is quantization.default_qconfig
