"""Benchmark: syncbn.SyncBatchNorm against local BatchNorm, the sync floor and a naive SyncBN.

``python -m syncbn bench`` (or ``python benchmarks/bench_cpu.py``) spawns ``W``
gloo ranks on 127.0.0.1 for each world size, one intra-op thread each, and in
every rank measures the layers side by side on the same input, in the same
run, interleaved in rounds (A/B/C, then B/C/A, ...) so that drift hits all alike:

- ``syncbn``: :class:`syncbn.SyncBatchNorm` over the ``W`` ranks;
- ``local``: ``torch.nn.BatchNorm{1,2}d`` with no synchronization;
- ``floor``: the same local BatchNorm plus two bare ``dist.all_reduce`` calls of
  syncbn's sizes (``2C + 2`` float64 after the forward, ``2C + 2`` float64 inside
  backward, :class:`FloorCollectives`): no synchronized BatchNorm that computes
  like torch can be faster, so ``syncbn/floor`` is the figure of merit;
- ``gather_floor``: the floor with syncbn's exchange: on gloo groups of up to
  ``_comm.GATHER_MAX_RANKS`` ranks two bare ``dist.all_gather`` calls of the same
  sizes (``_comm.gathers``: syncbn sums its buffers that way there, in half the
  message rounds of gloo's all-reduce), above that the floor's all-reduces.
  ``syncbn/floor`` compares syncbn with the
  all-reduce floor the issue defines; ``syncbn/gather_floor`` with the collectives
  syncbn actually runs, so it isolates syncbn's own work;
- ``naive``: a synchronized BatchNorm written the way pure-Python implementations
  in the field do it (detectron2's ``NaiveSyncBatchNorm``): per-channel
  ``[E[x], E[x²]]`` through a differentiable all_reduce (an autograd Function whose
  backward all-reduces the gradient), ``var = E[x²] − E[x]²``, normalization in
  torch ops, autograd doing the backward.

Compiled variants (``--compile``, by default at ``W = 2`` for float32 inputs):
``syncbn_compiled`` and ``local_compiled`` are ``torch.compile(layer,
fullgraph=True)`` (a chain ``L@shape``: the whole chain in one graph, as a model is
compiled); ``floor_compiled`` is the compiled local BatchNorm inside the
floor's two bare collectives (per layer). The first call (forward + backward, compiling)
is timed apart as ``compile_s``. A shape with ``:mask`` (``N x C x L:mask``) adds
``syncbn_masked``: the same layer given a random padding mask (each sample's
length uniform in ``[L/2, L]``), beside the time of one elementwise pass over
the input (``x·m``), the most the mask may cost.

One timed iteration is forward + backward of one layer in training mode with a
fixed upstream gradient (``torch.autograd.grad`` for the input, weight and
bias, so nothing accumulates). Every iteration starts after a barrier, so rank
skew from the previous iteration is not counted again; rank 0's per-iteration
times give the median and p10/p90, and the per-iteration maximum over ranks
gives a second median. Besides times, each case records for every variant the
collectives and bytes per rank of one training step (``torch.distributed``
wrapped during the step) and the memory autograd keeps for backward
(``torch.autograd.graph.saved_tensors_hooks``, unique storages). At ``W = 2``
the core's pieces are timed one by one (``profile``) to show what bounds it.

Results are one JSON document (environment, configuration, every case, the
targets of the performance issue with met/missed) and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _comm, _stats, _step
from ..functional import call_site
from ..modules import SyncBatchNorm
from . import launch as _launch
from .kernels import count_kernels

__all__ = ["BenchConfig", "ShapeSpec", "main", "parse_shape", "run_bench"]

SCHEMA = "syncbn-bench/1"
VARIANTS = ("syncbn", "floor", "local", "naive", "gather_floor")
"""The eager variants every case measures."""
COMPILED_VARIANTS = ("syncbn_compiled", "floor_compiled", "local_compiled")
MASKED_VARIANT = "syncbn_masked"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

MEMORY_BYTES_PER_CHANNEL = 64
"""The O(C) allowance of the memory target: bytes saved beyond the input per channel
(eight float64 values; parameters and statistics are a few float32/float64 each)."""
MEMORY_BYTES_FIXED = 256
"""... plus this many bytes (a count)."""

DEFAULT_SHAPES = ("16@4x64x8x8", "16@32x64", "8x64x56x56", "8x64x56x56:cl", "32x256x14x14",
                  "64x512x7x7", "256x1024", "32x256x128:mask")
"""The host-bound chains first (``16@``: 16 layers one after another on a small input, where
a layer's host work sets the step time, as on a GPU), then the kernel-bound shapes."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class UsageError(ValueError):
    """A bad option; the message says what was expected and how to fix it."""


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """An input shape ``(N, C, ...)`` and whether it is channels_last (4-d only)."""

    shape: tuple[int, ...]
    channels_last: bool = False
    masked: bool = False  # also time syncbn with a random padding mask
    layers: int = 1  # a chain of this many layers (``16@4x64x8x8``)

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def label(self) -> str:
        text = "x".join(map(str, self.shape))
        chain = f"{self.layers}@" if self.layers > 1 else ""
        return (chain + text + (":cl" if self.channels_last else "")
                + (":mask" if self.masked else ""))


def parse_shape(text: str) -> ShapeSpec:
    """``"8x64x56x56"``, ``"8x64x56x56:cl"`` (channels_last), ``"32x256x128:mask"``
    (also time a padding mask) or ``"16@4x64x8x8"`` (a chain of 16 layers) →
    :class:`ShapeSpec`.

    Raises:
        UsageError: not 2 to 4 positive integers joined by ``x``, ``:cl`` on a non-4-d
            shape, ``:mask`` on a 2-d one or on a chain, or a chain length below 1.
    """
    layers = 1
    chain, at, rest = text.strip().partition("@")
    if at:
        if not chain.isdigit() or int(chain) < 1:
            raise UsageError(f"--shapes expects a chain as LAYERS@SHAPE with LAYERS >= 1, e.g. "
                             f"16@4x64x8x8, got {text!r}")
        layers, text = int(chain), rest
    body, _, suffix = text.strip().partition(":")
    try:
        shape = tuple(int(part) for part in body.lower().split("x"))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 4 or min(shape) < 1 or suffix not in ("", "cl", "mask"):
        raise UsageError(
            f"--shapes expects sizes like 8x64x56x56 (N x C x ...: 2 to 4 positive integers), "
            f"optionally with ':cl' for channels_last or ':mask' for a padding mask, "
            f"got {text!r}"
        )
    if suffix == "cl" and len(shape) != 4:
        raise UsageError(f"':cl' (channels_last) needs a 4-d shape N x C x H x W, got {text!r}")
    if suffix == "mask" and len(shape) < 3:
        raise UsageError(f"':mask' (a padding mask) needs a shape N x C x L (or more dims), "
                         f"got {text!r}")
    if suffix == "mask" and layers > 1:
        raise UsageError(f"':mask' times one layer; drop it from the chain {text!r}")
    return ShapeSpec(shape, suffix == "cl", suffix == "mask", layers)


@dataclass(frozen=True)
class Iterations:
    """How many iterations one world size gets."""

    warmup: int  # per variant, before timing
    rounds: int  # interleaved rounds
    per_round: int  # timed iterations of each variant in one round

    @property
    def samples(self) -> int:
        return self.rounds * self.per_round


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs (pickled to the ranks)."""

    shapes: tuple[ShapeSpec, ...]
    dtypes: tuple[str, ...]
    world_sizes: tuple[int, ...]
    iterations: dict[int, Iterations]  # by world size
    profile_iters: int  # 0: no piece-by-piece profile
    seed: int
    timeout_s: float
    out: Path
    quick: bool
    argv: tuple[str, ...] = ()
    compile_world_sizes: tuple[int, ...] = ()  # where the compiled variants run
    compile_dtypes: tuple[str, ...] = ("float32",)


# ---------------------------------------------------------------------------
# The naive baseline (detectron2's NaiveSyncBatchNorm, reduced to its essentials)
# ---------------------------------------------------------------------------


class _DifferentiableAllReduce(torch.autograd.Function):
    """Sum over the group; the backward sums the gradient over the group too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class NaiveSyncBatchNorm(nn.Module):
    """Synchronized BN from a differentiable all_reduce of ``[E[x], E[x²]]`` (the field's way).

    Assumes equal per-rank batches (it divides by ``W``), takes
    ``var = E[x²] − E[x]²`` unclamped, computes statistics in float32 for 16-bit
    inputs, and lets autograd differentiate every op, so it keeps the float32
    copies and intermediates alive for backward.
    """

    weight: nn.Parameter
    bias: nn.Parameter
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, group: Any, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.group = group
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        dims = _stats.reduce_dims(x.dim())
        channels = x.size(1)
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xs.mean(dims)
        meansqr = (xs * xs).mean(dims)
        world = dist.get_world_size(self.group)
        both = _DifferentiableAllReduce.apply(  # type: ignore[no-untyped-call]  # untyped stub
            torch.cat([mean, meansqr]), self.group
        ) * (1.0 / world)
        mean, meansqr = torch.split(both, channels)
        var = meansqr - mean * mean
        with torch.no_grad():
            count = x.numel() // channels * world
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            unbiased = var.detach() * count / max(count - 1, 1)
            self.running_var += self.momentum * (unbiased - self.running_var)
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - mean * scale
        out = xs * _stats.channel_view(scale, x.dim()) + _stats.channel_view(shift, x.dim())
        return out.to(x.dtype)


# ---------------------------------------------------------------------------
# Measurements inside one rank
# ---------------------------------------------------------------------------


def _bare_collective(channels: int, group: Any, gather: bool) -> None:
    """One bare collective of syncbn's size, ``2C + 2`` float64: an all_reduce, or with
    ``gather`` the collective syncbn runs on this group (``_comm.gathers``: an all_gather of
    every rank's buffer on gloo groups of up to 4 ranks, else the same all_reduce)."""
    buffer = torch.zeros(2 * channels + 2, dtype=torch.float64)
    if gather and _comm.gathers(group, buffer):
        table = torch.empty(dist.get_world_size(group), buffer.numel(), dtype=torch.float64)
        dist.all_gather(list(table.unbind()), buffer, group=group)
    else:
        dist.all_reduce(buffer, group=group)


class FloorCollectives(torch.autograd.Function):
    """The identity, plus syncbn's two collectives as bare ``dist.all_reduce`` (or, with
    ``gather``, ``dist.all_gather``) calls.

    Forward exchanges ``2C + 2`` float64 values (syncbn's forward moments, count
    and key), backward another ``2C + 2`` (its gradient sums): the sizes syncbn
    sends, with nothing computed around them. Applied to a local BatchNorm's
    output, it makes the floor of a synchronized BatchNorm.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, channels: int, group: Any, gather: bool = False) -> Tensor:
        ctx.channels = channels
        ctx.group = group
        ctx.gather = gather
        _bare_collective(channels, group, gather)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        _bare_collective(ctx.channels, ctx.group, ctx.gather)
        return grad, None, None, None


class FloorBatchNorm(nn.Module):
    """Local BatchNorm (``inner``, possibly compiled) inside :class:`FloorCollectives`."""

    def __init__(self, inner: Callable[[Tensor], Tensor], channels: int, group: Any,
                 gather: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.channels = channels
        self.group = group
        self.gather = gather

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = FloorCollectives.apply(  # type: ignore[no-untyped-call]  # untyped stub
            self.inner(x), self.channels, self.group, self.gather)
        return out


@dataclass
class _Variant:
    """What one variant runs: ``call(x)``, and the module holding its weight and bias."""

    call: Callable[[Tensor], Tensor]
    module: nn.Module


def _local_bn(channels: int, ndim: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if ndim <= 3 else nn.BatchNorm2d(channels)


def _chain(parts: list[_Variant]) -> _Variant:
    """The variants one after another (the output of one is the input of the next)."""

    def run(x: Tensor) -> Tensor:
        for part in parts:
            x = part.call(x)
        return x

    return _Variant(run, nn.ModuleList([part.module for part in parts]))


def _make_layers(channels: int, ndim: int, group: Any, mask: Tensor | None = None,
                 compiled: bool = False, layers: int = 1) -> dict[str, _Variant]:
    """The variants of one case (each its own module), eager first, then compiled; with
    ``layers > 1`` each is a chain of that many layers (the floor: each layer with its
    two bare collectives; the compiled syncbn and local chains: one graph each, as a
    model is compiled, so the per-graph cost of a compiled call is paid once per chain)."""
    if layers > 1:
        chains = [_make_layers(channels, ndim, group, None, compiled) for _ in range(layers)]
        chained = {name: _chain([chain[name] for chain in chains]) for name in chains[0]}
        for name in ("syncbn_compiled", "local_compiled"):
            if name in chained:  # one graph for the whole chain, as a model is compiled
                whole = nn.Sequential(*(layer[name].module for layer in chains))
                chained[name] = _Variant(
                    torch.compile(whole, fullgraph=True, dynamic=False), whole)
        return chained
    modules: dict[str, nn.Module] = {
        "syncbn": SyncBatchNorm(channels),
        "floor": _local_bn(channels, ndim),
        "local": _local_bn(channels, ndim),
        "naive": NaiveSyncBatchNorm(channels, group),
        "gather_floor": _local_bn(channels, ndim),
    }
    if mask is not None:
        modules[MASKED_VARIANT] = SyncBatchNorm(channels)
    if compiled:  # local before floor: the floor's BatchNorm reuses local's compiled code
        modules["syncbn_compiled"] = SyncBatchNorm(channels)
        modules["local_compiled"] = _local_bn(channels, ndim)
        modules["floor_compiled"] = _local_bn(channels, ndim)
    for layer in modules.values():
        layer.train()
        with torch.no_grad():  # the same affine parameters everywhere, not the identity
            weight = layer.get_parameter("weight")
            bias = layer.get_parameter("bias")
            weight.copy_(torch.linspace(0.5, 1.5, channels))
            bias.copy_(torch.linspace(-0.1, 0.1, channels))
    variants: dict[str, _Variant] = {}
    for name, layer in modules.items():
        call: Callable[[Tensor], Tensor] = layer
        if name.endswith("_compiled"):
            call = torch.compile(layer, fullgraph=True, dynamic=False)
        if name.startswith("floor"):
            call = FloorBatchNorm(call, channels, group)
        if name == "gather_floor":
            call = FloorBatchNorm(call, channels, group, gather=True)
        if name == MASKED_VARIANT:
            masked_layer, the_mask = layer, mask

            def call(x: Tensor, layer: nn.Module = masked_layer,
                     m: Tensor | None = the_mask) -> Tensor:
                out: Tensor = layer(x, mask=m)
                return out

        variants[name] = _Variant(call, layer)
    return variants


def _make_inputs(spec: ShapeSpec, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.shape, generator=generator) * 2.0 + 0.5
    dy = torch.randn(spec.shape, generator=generator)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x.to(dtype).requires_grad_(), dy.to(dtype)


def padding_mask(shape: Sequence[int], seed: int) -> Tensor:
    """A bool mask of ``shape`` without dim 1: sample ``n`` counts its first ``len_n``
    positions along the last dim, ``len_n`` uniform in ``[L/2, L]`` (padded sequences)."""
    generator = torch.Generator().manual_seed(seed)
    length = shape[-1]
    lengths = torch.randint(max(length // 2, 1), length + 1, (shape[0],), generator=generator)
    positions = torch.arange(length)
    mask = positions < lengths.view(-1, *([1] * (len(shape) - 2)))  # (N, 1.., L)
    return mask.expand(shape[0], *shape[2:]).contiguous()


def _step_fn(variant: _Variant, x: Tensor, dy: Tensor) -> Callable[[], None]:
    inputs = (x, *variant.module.parameters())
    call = variant.call

    def step() -> None:
        y = call(x)
        torch.autograd.grad(y, inputs, dy)

    return step


def _time_interleaved(steps: dict[str, Callable[[], None]], iters: Iterations,
                      group: Any) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-iteration wall and CPU milliseconds of each step, in rotating rounds, barrier first.

    The CPU time is this thread's (``time.thread_time``): compute without the
    waits in collectives and without time the OS gave to other processes.
    """
    names = list(steps)
    for name in names:
        for _ in range(iters.warmup):
            steps[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for round_index in range(iters.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                step = steps[name]
                for _ in range(iters.per_round):
                    dist.barrier(group)
                    start_cpu = time.thread_time_ns()
                    start = time.perf_counter_ns()
                    step()
                    wall[name].append((time.perf_counter_ns() - start) / 1e6)
                    cpu[name].append((time.thread_time_ns() - start_cpu) / 1e6)
    finally:
        gc.enable()
    return wall, cpu


_SENT_TENSOR = {  # collective -> (position, keyword) of the tensor this rank sends
    "all_reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter_tensor": (1, "input"),
    "all_to_all_single": (1, "input"),
}


@contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record ``(name, bytes sent by this rank)`` for each ``torch.distributed`` collective.

    Wraps the module-level functions, which is what every caller (syncbn's
    ``_comm`` included) looks up at call time.
    """
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in _SENT_TENSOR}

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        position, keyword = _SENT_TENSOR[name]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sent = args[position] if len(args) > position else kwargs.get(keyword)
            size = sent.numel() * sent.element_size() if isinstance(sent, Tensor) else 0
            calls.append((name, size))
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _comm_per_step(variant: _Variant, x: Tensor, dy: Tensor) -> dict[str, Any]:
    """Collectives and bytes this rank sends in one training step, forward and backward,
    and which collectives they were (``kinds``)."""
    layer = variant.module
    inputs = (x, layer.get_parameter("weight"), layer.get_parameter("bias"))
    with count_collectives() as forward_calls:
        y = variant.call(x)
    with count_collectives() as backward_calls:
        torch.autograd.grad(y, inputs, dy)
    return {
        "collectives": len(forward_calls) + len(backward_calls),
        "forward_collectives": len(forward_calls),
        "backward_collectives": len(backward_calls),
        "bytes": sum(size for _, size in forward_calls + backward_calls),
        "forward_bytes": sum(size for _, size in forward_calls),
        "backward_bytes": sum(size for _, size in backward_calls),
        "kinds": sorted({name for name, _ in forward_calls + backward_calls}),
    }


def saved_for_backward(forward: Callable[[], Tensor], x: Tensor,
                       preexisting: Sequence[Tensor] = ()) -> dict[str, int]:
    """Bytes autograd keeps for backward while ``forward()`` builds its graph.

    Counts each storage once (``saved_tensors_hooks`` see every saved tensor):
    ``saved_bytes`` in all, ``input_bytes`` of ``x``'s storage, ``beyond_input_bytes``
    = saved − (the input's storage if saved), and ``allocated_bytes``: saved storages
    that are neither the input nor one of ``preexisting`` (parameters, buffers),
    i.e. memory that exists only because of the graph.
    """
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def unpack(tensor: Tensor) -> Tensor:
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = forward()
    del y
    input_key = x.untyped_storage().data_ptr()
    known = {t.untyped_storage().data_ptr() for t in preexisting}
    total = sum(storages.values())
    input_saved = storages.get(input_key, 0)
    return {
        "saved_bytes": total,
        "input_bytes": x.untyped_storage().nbytes(),
        "input_saved": int(input_key in storages),
        "beyond_input_bytes": total - input_saved,
        "allocated_bytes": sum(n for key, n in storages.items()
                               if key != input_key and key not in known),
        "tensors": len(storages),
    }


def _memory(variant: _Variant, x: Tensor) -> dict[str, int]:
    layer = variant.module
    state = [*layer.parameters(), *layer.buffers()]
    return saved_for_backward(lambda: variant.call(x), x, state)


def _timed(fn: Callable[[], object], iters: int, group: Any,
           cpu: list[float] | None = None) -> list[float]:
    """Per-iteration wall milliseconds of ``fn`` (barrier before each), after 2 warm-up calls.

    ``cpu``, when given, receives this thread's CPU milliseconds of each call.
    """
    for _ in range(2):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier(group)
        start_cpu = time.thread_time_ns()
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
        if cpu is not None:
            cpu.append((time.thread_time_ns() - start_cpu) / 1e6)
    return samples


def _profile_pieces(layer: SyncBatchNorm, x: Tensor, dy: Tensor, iters: int,
                    group: Any) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The lean step's pieces (:mod:`syncbn._step`) timed one by one, and torch's training
    BN kernels beside them.

    Each piece calls what the CPU step calls, in its order, on the same kind of
    arguments (a float32 layer; 16-bit inputs included):

    - ``fwd_local_moments``: the deviations from the shift, their two sums and the
      float64 packing ``[Σd, Σd², n, key]`` (NumPy);
    - ``fwd_all_reduce``: :func:`_comm.reduce_checked_` (``2C + 2`` float64 values, the
      tail read and checked on the host);
    - ``fwd_merge_stats``: :func:`_step.merge_on_host` and the running-statistics update
      :func:`_step.update_on_host` (on scratch buffers);
    - ``fwd_normalize``: torch's inference BN kernel with the global statistics;
    - ``bwd_grad_sums``: torch's backward reduction kernel and the float64 packing;
    - ``bwd_all_reduce``: :func:`_comm.reduce_checked_` (``2C + 2`` float64 values);
    - ``bwd_dx``: the coefficients (NumPy) and :func:`_step.input_grad`.

    ``fwd_*`` and ``bwd_*`` add up to syncbn's step minus the module's and autograd's
    Python overhead; ``torch_fwd``/``torch_bwd`` are torch's training batch-norm
    kernels (the floor). Returns wall and CPU milliseconds per call, by piece.
    """
    xd = x.detach()
    channels = layer.num_features
    eps = layer.eps
    weight = layer.weight.detach()
    bias = layer.bias.detach()
    site = call_site(xd, layer.layer_name, layer.timeout, layer.debug, eps=eps, decay=0.9)
    name = str(group.group_name)
    plan = _step.plan_for(xd, site, eps, name)
    plan.shift.copy_(xd.transpose(0, 1).reshape(channels, -1)[:, 0])  # a shift near the data
    key_f, key_b = plan.key_forward, plan.key_backward

    def fwd_local_moments() -> Tensor:
        d = torch.sub(xd, plan.shift_view, out=torch.empty_like(xd, dtype=plan.acc))
        first = d.sum(plan.dims)
        second = d.square_().sum(plan.dims)
        packed = torch.empty(2 * channels + 2, dtype=torch.float64)
        host = packed.numpy()
        host[:channels] = first.numpy()
        host[channels:-2] = second.numpy()
        host[-2:] = (plan.count, key_f)
        return packed

    forward_packed = fwd_local_moments()

    def fwd_all_reduce() -> object:
        packed = forward_packed.clone()
        return _comm.reduce_checked_(packed, name, site, "forward", 0, xd.shape, key_f,
                                     host=packed.numpy())

    reduced = forward_packed.clone()
    fwd_all_reduce()
    _comm.reduce_checked_(reduced, name, site, "forward", 0, xd.shape, key_f,
                          host=reduced.numpy())
    scratch_mean = torch.zeros(channels)
    scratch_var = torch.ones(channels)

    def fwd_merge_stats() -> _step.HostMerged:
        merged = _step.merge_on_host(reduced.numpy(), plan.shift_host, eps, True,
                                     torch.empty((5, channels), dtype=plan.acc),
                                     weight.numpy())
        _step.update_on_host(scratch_mean, scratch_var, merged, 0.9, None)
        return merged

    stats = fwd_merge_stats().stats
    mean, inv_std, scale = stats[0], stats[1], stats[2]

    def fwd_normalize() -> object:
        return torch.batch_norm(xd, scale, bias, mean, plan.ones, False, 0.0, 0.0, False)

    def bwd_grad_sums() -> Tensor:
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, xd, plan.ones, None, None, mean, inv_std, True, 0.0, [False, True, True])
        packed = torch.empty(2 * channels + 2, dtype=torch.float64)
        host = packed.numpy()
        host[:channels] = sum_dy.numpy()
        host[channels:-2] = sum_dy_xhat.numpy()
        host[-2:] = (0.0, key_b)
        return packed

    backward_packed = bwd_grad_sums()

    def bwd_all_reduce() -> object:
        packed = backward_packed.clone()
        return _comm.reduce_checked_(packed, name, site, "backward", 0, xd.shape, key_b,
                                     host=packed.numpy())

    def bwd_dx() -> object:
        coeffs = torch.empty((2, channels), dtype=plan.acc)
        np.multiply(backward_packed.numpy()[:2 * channels].reshape(2, channels),
                    stats.numpy()[-2:], out=coeffs.numpy(), casting="same_kind")
        c_prime, b = coeffs.unbind()
        return _step.input_grad(xd, dy, mean, scale, b, c_prime, plan)

    running_mean = torch.zeros(channels)
    running_var = torch.ones(channels)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        xd, weight, bias, running_mean, running_var, True, 0.1, eps)

    def torch_fwd() -> object:
        return torch.ops.aten.native_batch_norm(
            xd, weight, bias, running_mean, running_var, True, 0.1, eps)

    def torch_bwd() -> object:
        return torch.ops.aten.native_batch_norm_backward(
            dy, xd, weight, running_mean, running_var, save_mean, save_invstd, True, eps,
            [True, True, True])

    pieces: dict[str, Callable[[], object]] = {
        "fwd_local_moments": fwd_local_moments,
        "fwd_all_reduce": fwd_all_reduce,
        "fwd_merge_stats": fwd_merge_stats,
        "fwd_normalize": fwd_normalize,
        "bwd_grad_sums": bwd_grad_sums,
        "bwd_all_reduce": bwd_all_reduce,
        "bwd_dx": bwd_dx,
        "torch_fwd": torch_fwd,
        "torch_bwd": torch_bwd,
    }
    cpu: dict[str, list[float]] = {name: [] for name in pieces}
    with torch.no_grad():
        wall = {name: _timed(fn, iters, group, cpu[name]) for name, fn in pieces.items()}
    return wall, cpu


def _first_calls(steps: dict[str, Callable[[], None]], group: Any) -> dict[str, float]:
    """Seconds of each compiled variant's first step (forward + backward: compiling)."""
    seconds = {}
    for name, step in steps.items():
        if name.endswith("_compiled"):
            dist.barrier(group)
            start = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - start
    return seconds


def _measure_case(spec: ShapeSpec, dtype_name: str, iters: Iterations, profile_iters: int,
                  seed: int, rank: int, group: Any, compiled: bool = False) -> dict[str, Any]:
    """Everything one rank measures for one (shape, dtype): raw samples, comm, memory."""
    torch.manual_seed(seed)
    dtype = DTYPES[dtype_name]
    x, dy = _make_inputs(spec, dtype, seed * 1000 + rank)
    mask = padding_mask(spec.shape, seed * 1000 + rank) if spec.masked else None
    if compiled:
        torch._dynamo.reset()  # every case compiles afresh: its first call is its compile time
    variants = _make_layers(spec.channels, len(spec.shape), group, mask, compiled, spec.layers)
    steps = {name: _step_fn(variant, x, dy) for name, variant in variants.items()}
    compile_s = _first_calls(steps, group)
    samples, cpu_samples = _time_interleaved(steps, iters, group)
    eager = [name for name in variants if not name.endswith("_compiled")]
    kernels = {}
    for name in eager:  # every rank profiles alike: the steps run collectives
        dist.barrier(group)
        per_step, _ = count_kernels(steps[name], steps=2)
        kernels[name] = per_step / spec.layers
    single = spec.layers == 1
    comm = {name: _comm_per_step(variants[name], x, dy) for name in eager} if single else {}
    memory = {name: _memory(variants[name], x) for name in eager} if single else {}
    extra: dict[str, list[float]] = {}
    if mask is not None:  # one elementwise pass over the input: the most the mask may cost
        weights = mask.unsqueeze(1).to(dtype)
        xd = x.detach()
        with torch.no_grad():
            extra["elementwise_pass"] = _timed(lambda: xd * weights, iters.samples, group)
        extra["valid_fraction"] = [float(mask.float().mean())]
    profile: dict[str, list[float]] = {}
    profile_cpu: dict[str, list[float]] = {}
    if profile_iters > 0 and single:
        syncbn_layer = variants["syncbn"].module
        assert isinstance(syncbn_layer, SyncBatchNorm)
        profile, profile_cpu = _profile_pieces(syncbn_layer, x, dy, profile_iters, group)
    return {"samples": samples, "cpu_samples": cpu_samples, "comm": comm, "memory": memory,
            "profile": profile, "profile_cpu": profile_cpu, "compile_s": compile_s,
            "extra": extra, "kernels": kernels}


def _latency(group: Any, iters: int) -> dict[str, float]:
    """Rank 0's median of a bare barrier and of an all_reduce of 129 float32 (C = 64's size).

    The floor under any synchronized layer at this moment on this machine.
    """
    small = torch.zeros(129)
    barrier = _timed(lambda: dist.barrier(group), iters, group)
    all_reduce = _timed(lambda: dist.all_reduce(small, group=group), iters, group)
    return {"barrier": percentile(barrier, 0.5),
            "all_reduce_129_float32": percentile(all_reduce, 0.5),
            "all_reduce_129_float32_p90": percentile(all_reduce, 0.9)}


@dataclass(frozen=True)
class _RankJob:
    """One world size's work, handed to every spawned rank."""

    config: BenchConfig
    world_size: int
    result_path: str


def _bench_rank(env: _launch.DistEnv, job: _RankJob) -> int:
    """Body of one spawned rank: measure every case; rank 0 writes the summary of all ranks."""
    config = job.config
    iters = config.iterations[job.world_size]
    group = dist.group.WORLD
    profile_iters = config.profile_iters if job.world_size == 2 else 0
    if config.compile_world_sizes:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # no compile-worker pool: one core per rank
        inductor_config.fx_graph_cache = False  # report the cold compile, every run
    latency = _latency(group, iters.samples)
    cases: list[dict[str, Any]] = []
    for spec in config.shapes:
        for dtype_name in config.dtypes:
            started = time.monotonic()
            compiled = (job.world_size in config.compile_world_sizes
                        and dtype_name in config.compile_dtypes)
            raw = _measure_case(spec, dtype_name, iters, profile_iters, config.seed,
                                env.rank, group, compiled)
            gathered: list[Any] = [None] * env.world_size
            dist.all_gather_object(gathered, raw, group=group)
            if env.rank == 0:
                case = summarize_case(spec, dtype_name, gathered)
                cases.append(case)
                print(f"  W={job.world_size} {spec.label():>15} {dtype_name:>8}: "
                      f"syncbn/floor {case['ratios']['syncbn/floor']:.2f}, "
                      f"syncbn/local {case['ratios']['syncbn/local']:.2f}, "
                      f"syncbn/naive {case['ratios']['syncbn/naive']:.2f} "
                      f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    if env.rank == 0:
        run = {
            "world_size": job.world_size,
            "oversubscribed": job.world_size > (os.cpu_count() or 1),
            "threads_per_rank": torch.get_num_threads(),
            "iterations": {"warmup": iters.warmup, "rounds": iters.rounds,
                           "per_round": iters.per_round, "samples": iters.samples},
            "latency_ms": latency,
            "cases": cases,
        }
        Path(job.result_path).write_text(json.dumps(run))
    dist.barrier(group)
    return EXIT_OK


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats_of(rank0: Sequence[float], every_rank: Sequence[Sequence[float]],
              cpu: Sequence[float]) -> dict[str, float]:
    per_iter_max = [max(values) for values in zip(*every_rank, strict=True)]
    return {
        "median_ms": percentile(rank0, 0.5),
        "p10_ms": percentile(rank0, 0.1),
        "p90_ms": percentile(rank0, 0.9),
        "min_ms": min(rank0),
        "median_max_over_ranks_ms": percentile(per_iter_max, 0.5),
        "cpu_median_ms": percentile(cpu, 0.5),
        "samples": len(rank0),
    }


def summarize_case(spec: ShapeSpec, dtype_name: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians, ratios, comm and memory of one case from every rank's raw measurements."""
    rank0 = ranks[0]
    times = {
        name: _stats_of(rank0["samples"][name], [r["samples"][name] for r in ranks],
                        rank0["cpu_samples"][name])
        for name in rank0["samples"]
    }
    channels = spec.channels

    def ratio(a: str, b: str, key: str = "median_ms") -> float:
        return float(times[a][key] / times[b][key])

    ratios = {
        "syncbn/floor": ratio("syncbn", "floor"),
        "syncbn/local": ratio("syncbn", "local"),
        "syncbn/naive": ratio("syncbn", "naive"),
        "syncbn/gather_floor": ratio("syncbn", "gather_floor"),
        "gather_floor/floor": ratio("gather_floor", "floor"),
        "floor/local": ratio("floor", "local"),
        "naive/local": ratio("naive", "local"),
        "syncbn/floor_cpu": ratio("syncbn", "floor", "cpu_median_ms"),
        "syncbn/floor_max_over_ranks": ratio("syncbn", "floor", "median_max_over_ranks_ms"),
        "syncbn/local_max_over_ranks": ratio("syncbn", "local", "median_max_over_ranks_ms"),
        "syncbn/naive_max_over_ranks": ratio("syncbn", "naive", "median_max_over_ranks_ms"),
    }
    if "syncbn_compiled" in times:
        ratios["syncbn_compiled/floor_compiled"] = ratio("syncbn_compiled", "floor_compiled")
        ratios["syncbn_compiled/syncbn"] = ratio("syncbn_compiled", "syncbn")
        ratios["syncbn_compiled/local_compiled"] = ratio("syncbn_compiled", "local_compiled")
        ratios["local_compiled/local"] = ratio("local_compiled", "local")
    masked: dict[str, float] = {}
    if MASKED_VARIANT in times:
        ratios["syncbn_masked/syncbn"] = ratio(MASKED_VARIANT, "syncbn")
        pass_ms = percentile(rank0["extra"]["elementwise_pass"], 0.5)
        extra_ms = times[MASKED_VARIANT]["median_ms"] - times["syncbn"]["median_ms"]
        extra_cpu = times[MASKED_VARIANT]["cpu_median_ms"] - times["syncbn"]["cpu_median_ms"]
        masked = {"elementwise_pass_ms": pass_ms, "extra_ms": extra_ms,
                  "extra_cpu_ms": extra_cpu, "extra_passes": extra_ms / pass_ms,
                  "extra_passes_cpu": extra_cpu / pass_ms,
                  "valid_fraction": rank0["extra"]["valid_fraction"][0]}
    profile = _profile_summary(rank0["profile"], times["syncbn"]["median_ms"])
    profile_cpu = _profile_summary(rank0["profile_cpu"], times["syncbn"]["cpu_median_ms"])
    comm = dict(rank0["comm"])
    comm["bytes_limit"] = 16 * (2 * channels + 2)  # 2C + 2 float64 each way
    memory = dict(rank0["memory"])
    memory["allowance_bytes"] = MEMORY_BYTES_PER_CHANNEL * channels + MEMORY_BYTES_FIXED
    return {
        "shape": list(spec.shape),
        "label": spec.label(),
        "memory_format": spec.memory_format,
        "dtype": dtype_name,
        "channels": channels,
        "layers": spec.layers,
        "input_bytes": (rank0["memory"]["syncbn"]["input_bytes"] if "syncbn" in rank0["memory"]
                        else spec_bytes(spec, dtype_name)),
        "kernels_per_layer": dict(rank0.get("kernels", {})),
        "times": times,
        "ratios": ratios,
        "compile_s": {name: max(r["compile_s"][name] for r in ranks)
                      for name in rank0["compile_s"]},
        "masked": masked,
        "comm": comm,
        "memory": memory,
        "profile_ms": profile,
        "profile_cpu_ms": profile_cpu,
    }


def spec_bytes(spec: ShapeSpec, dtype_name: str) -> int:
    """Bytes of one input of the case."""
    count = 1
    for size in spec.shape:
        count *= size
    return count * DTYPES[dtype_name].itemsize


def _profile_summary(pieces: dict[str, list[float]], syncbn_step: float) -> dict[str, float]:
    """Median of each piece, their sum, the measured syncbn step and torch's fwd + bwd."""
    if not pieces:
        return {}
    profile = {name: percentile(values, 0.5) for name, values in pieces.items()}
    profile["syncbn_pieces_sum"] = sum(v for k, v in profile.items()
                                       if k.startswith(("fwd_", "bwd_")))
    profile["syncbn_step"] = syncbn_step
    profile["torch_fwd_bwd"] = profile["torch_fwd"] + profile["torch_bwd"]
    return profile


def evaluate_targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The performance issue's targets, each with the figures that decide it and met/missed."""
    targets: list[dict[str, Any]] = []
    by_world = {run["world_size"]: run for run in runs}
    two = by_world.get(2)
    if two is not None:
        for case in two["cases"]:
            if case["dtype"] != "float32" or case["label"].endswith(":mask"):
                continue
            nchw = (len(case["shape"]) == 4 and case["memory_format"] == "contiguous"
                    and case.get("layers", 1) == 1)
            limit = 1.0 if nchw else 1.10
            value = case["ratios"]["syncbn/floor"]
            targets.append(_target(f"syncbn/floor <= {limit}, W=2, {_case_id(case)}",
                                   value, value <= limit))
            if case.get("layers", 1) > 1:
                value = case["ratios"]["syncbn/naive"]
                targets.append(_target(f"syncbn/naive <= 0.85, W=2, {_case_id(case)}",
                                       value, value <= 0.85))
                value = case["kernels_per_layer"].get("syncbn", float("nan"))
                targets.append(_target(f"kernels per layer-step <= 25, W=2, {_case_id(case)}",
                                       value, value <= 25))
        for case in two["cases"]:
            ratios = case["ratios"]
            if "syncbn_compiled/syncbn" in ratios:
                value = ratios["syncbn_compiled/syncbn"]
                targets.append(_target(f"compiled syncbn <= eager syncbn, W=2, {_case_id(case)}",
                                       value, value <= 1.0))
                value = ratios["syncbn_compiled/floor_compiled"]
                targets.append(_target(f"compiled syncbn/compiled floor <= 1.10, W=2, "
                                       f"{_case_id(case)}", value, value <= 1.10))
            if case["masked"]:
                value = case["masked"]["extra_passes"]
                targets.append(_target(f"mask costs <= 1 elementwise pass, W=2, {_case_id(case)}",
                                       value, value <= 1.0))
    bytes_by_case: dict[str, dict[int, int]] = {}
    for run in runs:
        for case in run["cases"]:
            if "syncbn" not in case["comm"]:  # a chain: counted per layer in its kernels
                continue
            comm = case["comm"]["syncbn"]
            ok = (comm["forward_collectives"] == 1 and comm["backward_collectives"] == 1
                  and comm["bytes"] <= case["comm"]["bytes_limit"])
            targets.append(_target(
                f"2 collectives (1 fwd, 1 bwd), bytes <= 16(2C+2) = {case['comm']['bytes_limit']}, "
                f"W={run['world_size']}, {_case_id(case)}",
                f"{comm['forward_collectives']}+{comm['backward_collectives']}, {comm['bytes']} B",
                ok))
            bytes_by_case.setdefault(_case_id(case), {})[run["world_size"]] = comm["bytes"]
            memory = case["memory"]["syncbn"]
            limit = case["memory"]["allowance_bytes"]
            targets.append(_target(
                f"saved for backward <= input + {MEMORY_BYTES_PER_CHANNEL}C"
                f"+{MEMORY_BYTES_FIXED} B, W={run['world_size']}, {_case_id(case)}",
                f"input + {memory['beyond_input_bytes']} B",
                memory["saved_bytes"] <= memory["input_bytes"] + limit))
    for case_id, sizes in bytes_by_case.items():
        if len(sizes) > 1:
            targets.append(_target(f"bytes unchanged across W {sorted(sizes)}, {case_id}",
                                   sorted(set(sizes.values())), len(set(sizes.values())) == 1))
    return targets


def _target(name: str, value: Any, met: bool) -> dict[str, Any]:
    return {"target": name, "value": value, "met": bool(met)}


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['label']} {case['dtype']}"


# ---------------------------------------------------------------------------
# Environment, table, driver
# ---------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def environment(config: BenchConfig) -> dict[str, Any]:
    """What the figures depend on: versions, backend, device, cores, world sizes."""
    from .. import __version__

    affinity = getattr(os, "sched_getaffinity", None)
    cpus = os.cpu_count() or 1
    return {
        "torch": torch.__version__,
        "syncbn": __version__,
        "syncbn_git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "backend": "gloo",
        "device": "cpu",
        "cpu_count": cpus,
        "cpus_usable": len(affinity(0)) if affinity is not None else cpus,
        "threads_per_rank": 1,
        "world_sizes": list(config.world_sizes),
        "oversubscribed_world_sizes": [w for w in config.world_sizes if w > cpus],
        "rendezvous": "tcp://127.0.0.1 (free port)",
        "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME",
                                             "lo" if sys.platform.startswith("linux") else None),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1_5_15": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """The system load (other processes skew the figures), where the OS reports it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _compiled_cases(result: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(run["world_size"], case) for run in result["runs"] for case in run["cases"]
            if "syncbn_compiled" in case["times"]]


def _masked_cases(result: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(run["world_size"], case) for run in result["runs"] for case in run["cases"]
            if case["masked"]]


def format_table(result: dict[str, Any]) -> str:
    """The readable summary: times (median [p10–p90] ms), ratios, comm, memory, targets."""
    lines = []
    env = result["environment"]
    lines.append(f"syncbn {env['syncbn']} ({env['syncbn_git_commit']}), torch {env['torch']}, "
                 f"{env['backend']} on {env['device']}, {env['cpu_count']} CPUs, "
                 f"1 thread per rank")
    header = (f"{'W':>2} {'shape':>16} {'dtype':>8} | {'syncbn ms [p10-p90]':>22} | "
              f"{'floor ms':>8} {'local ms':>8} {'naive ms':>8} | "
              f"{'s/floor':>7} {'s/local':>7} {'s/naive':>7} {'s/gflr':>6} | "
              f"{'coll':>4} {'bytes':>6} | "
              f"{'saved/in s,f':>12} | {'cpu ms s,f,l':>17} | {'kernels s,f,l,n':>16}")
    for run in result["runs"]:
        note = " (oversubscribed: more ranks than cores, noisy)" if run["oversubscribed"] else ""
        lines.append("")
        latency = run["latency_ms"]
        lines.append(f"W = {run['world_size']}{note}: {run['iterations']['samples']} timed "
                     f"iterations per variant, {run['iterations']['warmup']} warm-up; "
                     f"all_reduce of 129 floats {latency['all_reduce_129_float32']:.3f} ms "
                     f"(p90 {latency['all_reduce_129_float32_p90']:.3f}), "
                     f"barrier {latency['barrier']:.3f} ms; load average (1, 5, 15 min) "
                     f"{run['loadavg_before']} before, {run['loadavg_after']} after")
        lines.append(header)
        lines.append("-" * len(header))
        for case in run["cases"]:
            t = case["times"]
            s = t["syncbn"]
            mem = case["memory"]
            saved = ",".join(f"{mem[v]['saved_bytes'] / mem[v]['input_bytes']:.2f}"
                             for v in ("syncbn", "floor")) if "syncbn" in mem else "-"
            comm = case["comm"].get("syncbn", {"collectives": "-", "bytes": "-"})
            cpu = ",".join(f"{t[v]['cpu_median_ms']:.2f}" for v in ("syncbn", "floor", "local"))
            counts = case.get("kernels_per_layer", {})
            kernels = ",".join(f"{counts[v]:.0f}" if v in counts else "-"
                               for v in ("syncbn", "floor", "local", "naive"))
            r = case["ratios"]
            lines.append(
                f"{run['world_size']:>2} {case['label']:>16} {case['dtype']:>8} | "
                f"{s['median_ms']:7.3f} [{s['p10_ms']:6.2f}-{s['p90_ms']:6.2f}] | "
                f"{t['floor']['median_ms']:8.3f} {t['local']['median_ms']:8.3f} "
                f"{t['naive']['median_ms']:8.3f} | "
                f"{r['syncbn/floor']:7.2f} {r['syncbn/local']:7.2f} {r['syncbn/naive']:7.2f} "
                f"{r['syncbn/gather_floor']:6.2f} | "
                f"{comm['collectives']:>4} {comm['bytes']:>6} | {saved:>12} | {cpu:>17} | "
                f"{kernels:>16}")
    compiled = _compiled_cases(result)
    if compiled:
        lines.append("")
        lines.append("compiled (torch.compile fullgraph; floor = compiled local BN + 2 bare "
                     "all_reduces), median ms, first call (compile) s:")
        lines.append(f"{'W':>2} {'shape':>16} {'dtype':>8} | {'syncbn_c':>8} {'floor_c':>8} "
                     f"{'local_c':>8} | {'sc/fc':>6} {'sc/s':>6} {'lc/l':>6} | "
                     f"{'compile s: syncbn, local':>25}")
        for world, case in compiled:
            t, r, c = case["times"], case["ratios"], case["compile_s"]
            lines.append(
                f"{world:>2} {case['label']:>16} {case['dtype']:>8} | "
                f"{t['syncbn_compiled']['median_ms']:8.3f} {t['floor_compiled']['median_ms']:8.3f} "
                f"{t['local_compiled']['median_ms']:8.3f} | "
                f"{r['syncbn_compiled/floor_compiled']:6.2f} {r['syncbn_compiled/syncbn']:6.2f} "
                f"{r['local_compiled/local']:6.2f} | "
                f"{c['syncbn_compiled']:12.1f} {c['local_compiled']:12.1f}")
    for world, case in _masked_cases(result):
        m = case["masked"]
        lines.append("")
        lines.append(
            f"masked W={world} {case['label']} {case['dtype']}: syncbn "
            f"{case['times']['syncbn']['median_ms']:.3f} ms, with mask "
            f"{case['times'][MASKED_VARIANT]['median_ms']:.3f} ms "
            f"(x{case['ratios']['syncbn_masked/syncbn']:.2f}; {m['extra_ms']:+.3f} ms = "
            f"{m['extra_passes']:.2f} elementwise passes of {m['elementwise_pass_ms']:.3f} ms; "
            f"CPU {m['extra_passes_cpu']:.2f} passes; {m['valid_fraction']:.0%} valid)")
    profiled = [c for run in result["runs"] for c in run["cases"] if c["profile_ms"]]
    if profiled:
        lines.append("")
        lines.append("W = 2, rank 0, median ms of each piece (barrier before each call):")
        names = list(profiled[0]["profile_ms"])
        short = [n.replace("fwd_", "f:").replace("bwd_", "b:") for n in names]
        lines.append(f"{'shape':>16} {'dtype':>8} " + " ".join(f"{s:>10.10}" for s in short))
        for case in profiled:
            lines.append(f"{case['label']:>16} {case['dtype']:>8} "
                         + " ".join(f"{case['profile_ms'][n]:10.3f}" for n in names))
    lines.append("")
    met = sum(t["met"] for t in result["targets"])
    lines.append(f"targets: {met} of {len(result['targets'])} met")
    for target in result["targets"]:
        if not target["met"]:
            value = target["value"]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"  MISSED {target['target']}: {shown}")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """The same figures as :func:`format_table`, as Markdown tables (for benchmarks/README.md)."""
    env = result["environment"]
    out = [
        f"syncbn {env['syncbn']} (`{env['syncbn_git_commit']}`), torch {env['torch']}, "
        f"Python {env['python']}, {env['backend']} on {env['device']}, {env['cpu_count']} CPUs, "
        f"1 thread per rank, {env['platform']}; load average at start "
        f"{env.get('loadavg_1_5_15')}",
        "",
    ]
    for run in result["runs"]:
        latency = run["latency_ms"]
        crowded = " — oversubscribed (more ranks than cores)" if run["oversubscribed"] else ""
        out += [
            f"**W = {run['world_size']}**{crowded}: {run['iterations']['samples']} timed "
            f"iterations per variant; all_reduce of 129 floats "
            f"{latency['all_reduce_129_float32']:.2f} ms median "
            f"(p90 {latency['all_reduce_129_float32_p90']:.2f}); load average "
            f"{run['loadavg_before']} → {run['loadavg_after']}",
            "",
            "| shape | dtype | syncbn ms | floor ms | local ms | naive ms | gather floor ms "
            "| **syncbn/floor** | syncbn/local | syncbn/naive | syncbn/gather floor "
            "| CPU ms s / f / l | coll. | bytes | "
            "saved − input, B (s / f) | kernels/layer s / f / l / n |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in run["cases"]:
            t = case["times"]
            cells = [f"{t[v]['median_ms']:.2f} [{t[v]['p10_ms']:.2f}–{t[v]['p90_ms']:.2f}]"
                     if v == "syncbn" else f"{t[v]['median_ms']:.2f}" for v in VARIANTS]
            cpu = " / ".join(f"{t[v]['cpu_median_ms']:.2f}" for v in ("syncbn", "floor", "local"))
            memory = " / ".join(str(case["memory"][v]["beyond_input_bytes"])
                                for v in ("syncbn", "floor")) if "syncbn" in case["memory"] else "–"
            comm = case["comm"].get("syncbn")
            coll = (f"{comm['forward_collectives']}+{comm['backward_collectives']} | "
                    f"{comm['bytes']}") if comm else "per layer 1+1 | –"
            counts = case.get("kernels_per_layer", {})
            kernels = " / ".join(f"{counts[v]:.0f}" if v in counts else "–"
                                 for v in ("syncbn", "floor", "local", "naive"))
            r = case["ratios"]
            out.append(
                f"| {case['label']} | {case['dtype']} | {' | '.join(cells)} | "
                f"**{r['syncbn/floor']:.2f}** | {r['syncbn/local']:.2f} | "
                f"{r['syncbn/naive']:.2f} | {r['syncbn/gather_floor']:.2f} | {cpu} | {coll} | "
                f"{memory} | {kernels} |")
        out.append("")
    compiled = _compiled_cases(result)
    if compiled:
        out += ["**Compiled** (`torch.compile(layer, fullgraph=True)`; the compiled floor is "
                "the compiled local BatchNorm inside the two bare all_reduces), median ms; "
                "first call = forward + backward while compiling (cold: no FX graph cache):", "",
                "| W | shape | dtype | syncbn compiled | floor compiled | local compiled | "
                "syncbn eager | **compiled syncbn / compiled floor** | compiled / eager syncbn "
                "| compiled / eager local | first call s (syncbn / local) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for world, case in compiled:
            t, r, c = case["times"], case["ratios"], case["compile_s"]
            out.append(
                f"| {world} | {case['label']} | {case['dtype']} | "
                f"{t['syncbn_compiled']['median_ms']:.2f} | "
                f"{t['floor_compiled']['median_ms']:.2f} | "
                f"{t['local_compiled']['median_ms']:.2f} | {t['syncbn']['median_ms']:.2f} | "
                f"**{r['syncbn_compiled/floor_compiled']:.2f}** | "
                f"{r['syncbn_compiled/syncbn']:.2f} | "
                f"{r['local_compiled/local']:.2f} | "
                f"{c['syncbn_compiled']:.1f} / {c['local_compiled']:.1f} |")
        out.append("")
    masked = _masked_cases(result)
    if masked:
        out += ["**Masked** (random padding mask, lengths uniform in [L/2, L]), median ms:", "",
                "| W | shape | dtype | syncbn | syncbn + mask | masked / unmasked | extra ms "
                "| one elementwise pass ms | **extra, in passes** (wall / CPU) | valid |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for world, case in masked:
            m = case["masked"]
            out.append(
                f"| {world} | {case['label']} | {case['dtype']} | "
                f"{case['times']['syncbn']['median_ms']:.2f} | "
                f"{case['times'][MASKED_VARIANT]['median_ms']:.2f} | "
                f"{case['ratios']['syncbn_masked/syncbn']:.2f} | {m['extra_ms']:+.2f} | "
                f"{m['elementwise_pass_ms']:.2f} | **{m['extra_passes']:.2f}** / "
                f"{m['extra_passes_cpu']:.2f} | {m['valid_fraction']:.0%} |")
        out.append("")
    profiled = [c for run in result["runs"] for c in run["cases"] if c["profile_ms"]]
    if profiled:
        names = list(profiled[0]["profile_ms"])
        out += ["**Profile, W = 2** (rank 0, median ms of each piece, barrier before each call):",
                "", "| shape | dtype | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for case in profiled:
            out.append(f"| {case['label']} | {case['dtype']} | "
                       + " | ".join(f"{case['profile_ms'][n]:.2f}" for n in names) + " |")
        out += ["", "**The same pieces in CPU ms** (this thread's CPU time: compute without "
                "waiting and without time given to other processes):", "",
                "| shape | dtype | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for case in profiled:
            out.append(f"| {case['label']} | {case['dtype']} | "
                       + " | ".join(f"{case['profile_cpu_ms'][n]:.2f}" for n in names) + " |")
        out.append("")
    met = sum(t["met"] for t in result["targets"])
    out += [f"Targets: {met} of {len(result['targets'])} met.", ""]
    out += [f"- MISSED {t['target']}: {t['value']:.3f}" if isinstance(t["value"], float)
            else f"- MISSED {t['target']}: {t['value']}"
            for t in result["targets"] if not t["met"]]
    return "\n".join(out)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Spawn each world size's ranks in turn, gather their summaries, evaluate the targets.

    Raises:
        syncbn.cli.launch.LaunchError: a rank failed (its traceback is in the message).
    """
    runs = []
    config.out.parent.mkdir(parents=True, exist_ok=True)
    for world_size in config.world_sizes:
        part = config.out.with_name(f".{config.out.name}.w{world_size}.part")
        started = time.monotonic()
        load_before = _loadavg()
        print(f"W = {world_size}: spawning {world_size} gloo ranks ...", file=sys.stderr,
              flush=True)
        try:
            _launch.spawn(_bench_rank, _RankJob(config, world_size, str(part)),
                          nproc=world_size, backend="gloo", device="cpu",
                          port=_launch.free_port(), timeout_s=config.timeout_s)
            run = json.loads(part.read_text())
        finally:
            part.unlink(missing_ok=True)
        run["wall_s"] = round(time.monotonic() - started, 1)
        run["loadavg_before"] = load_before
        run["loadavg_after"] = _loadavg()
        runs.append(run)
    return {
        "schema": SCHEMA,
        "environment": environment(config),
        "config": {
            "argv": list(config.argv),
            "quick": config.quick,
            "shapes": [s.label() for s in config.shapes],
            "dtypes": list(config.dtypes),
            "world_sizes": list(config.world_sizes),
            "params_dtype": "float32",
            "profile_iters": config.profile_iters,
            "compile_world_sizes": list(config.compile_world_sizes),
            "compile_dtypes": list(config.compile_dtypes),
            "seed": config.seed,
            "timing": "per iteration: barrier, then forward + backward (autograd.grad of "
                      "input, weight, bias with a fixed upstream gradient); variants "
                      "interleaved in rotating rounds; rank 0's medians",
        },
        "runs": runs,
        "targets": evaluate_targets(runs),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` options."""
    parser = argparse.ArgumentParser(
        prog="syncbn bench",
        description="Time syncbn.SyncBatchNorm against local torch BatchNorm (no sync) and a "
        "naive synchronized BatchNorm (differentiable all_reduce of E[x], E[x²]) on W gloo CPU "
        "ranks, forward + backward in training mode; count its collectives and bytes and the "
        "memory saved for backward; write JSON and print a table.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run (about a minute): W=2 only, few iterations")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="JSON output (default: bench-results/<timestamp>.json)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NxCx...",
                        help=f"input shapes, ':cl' for channels_last, 'L@' for a chain of L "
                        f"layers (default: "
                        f"{' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="input dtypes; parameters stay float32 (default: float32 bfloat16)")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=None, metavar="W",
                        help="ranks to spawn, one run each (default: 2 4; --quick: 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default: 50 at W <= cores, 20 above; "
                        "quick 5)")
    parser.add_argument("--per-round", type=int, default=None,
                        help="timed iterations of each variant per round (default: 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up iterations per variant (default: 10; quick 3)")
    parser.add_argument("--profile-iters", type=int, default=None,
                        help="iterations per piece of the W=2 profile; 0 skips it "
                        "(default: 40; quick 5)")
    parser.add_argument("--compile", choices=("none", "w2", "all"), default=None,
                        help="where the torch.compile variants run: none, W=2 only, or every "
                        "world size (default: w2; --quick: none); each case compiles afresh")
    parser.add_argument("--compile-dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="input dtypes of the compiled variants (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    parser.add_argument("--timeout", type=float, default=300.0, dest="timeout_s",
                        metavar="SECONDS",
                        help="rendezvous and collective timeout of the ranks (default: 300)")
    return parser


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    return value


def config_from_args(args: argparse.Namespace, argv: Sequence[str] = ()) -> BenchConfig:
    """Apply the defaults (full or ``--quick``) and validate.

    Raises:
        UsageError: a bad shape, count or world size.
    """
    quick = bool(args.quick)
    shapes = tuple(parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES))
    dtypes = tuple(dict.fromkeys(args.dtypes or ("float32", "bfloat16")))
    worlds = tuple(dict.fromkeys(args.world_sizes or ((2,) if quick else (2, 4))))
    for world in worlds:
        _positive("--world-sizes", world, minimum=2)
    cores = os.cpu_count() or 1
    iterations = {}
    for world in worlds:
        crowded = world > cores
        iterations[world] = Iterations(
            warmup=_positive("--warmup", args.warmup if args.warmup is not None
                             else (3 if quick else 10), minimum=0),
            rounds=_positive("--rounds", args.rounds or (5 if quick else 20 if crowded else 50)),
            per_round=_positive("--per-round", args.per_round or 3),
        )
    profile_iters = args.profile_iters if args.profile_iters is not None else (5 if quick else 40)
    _positive("--profile-iters", profile_iters, minimum=0)
    if not args.timeout_s > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout_s}")
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("bench-results") / f"{stamp}.json"
    where = args.compile or ("none" if quick else "w2")
    compile_worlds = {"none": (), "w2": tuple(w for w in worlds if w == 2), "all": worlds}[where]
    return BenchConfig(shapes=shapes, dtypes=dtypes, world_sizes=worlds, iterations=iterations,
                       profile_iters=profile_iters, seed=args.seed, timeout_s=args.timeout_s,
                       out=Path(out), quick=quick, argv=tuple(argv),
                       compile_world_sizes=compile_worlds,
                       compile_dtypes=tuple(args.compile_dtypes or ("float32",)))


def main(argv: Sequence[str] | None = None) -> int:
    """``syncbn bench``: 0 done (targets may be missed: see the table), 1 a rank failed,
    2 bad options."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or an argparse error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        config = config_from_args(args, argv)
    except UsageError as exc:
        print(f"syncbn bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_bench(config)
    except _launch.LaunchError as exc:
        print(f"syncbn bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"syncbn bench: error: cannot write {str(config.out)!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"\nwrote {config.out}")
    return EXIT_OK
