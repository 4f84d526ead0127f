"""Safe ``.pdparams`` loading, and mapping a Paddle state dict onto a torch model."""

from __future__ import annotations

import codecs
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from syncbn.paddle_compat import (
    STRUCTURE_KEY,
    BatchNorm,
    BatchNorm1D,
    BatchNorm2D,
    SyncBatchNorm,
    UnsafePickleError,
    load_pdparams,
    paddle_to_torch_state_dict,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "paddle"
needs_data = pytest.mark.skipif(
    not (DATA / "net.pdparams").is_file(),
    reason=f"Paddle reference files not found at {DATA} (the repo's sibling shared/ folder)",
)


def _write(tmp_path: Path, obj: object, protocol: int = 4, name: str = "x.pdparams") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# --- the real file written by PaddlePaddle 3.3.1 -------------------------------------------


@needs_data
def test_real_file_keys_shapes_dtypes() -> None:
    state = load_pdparams(DATA / "net.pdparams")
    assert STRUCTURE_KEY not in state
    assert "bn3.weight" not in state  # BatchNorm1D(5, weight_attr=False)
    shapes = {key: tuple(t.shape) for key, t in state.items()}
    assert shapes["conv1.weight"] == (8, 3, 3, 3)
    assert shapes["fc.weight"] == (4, 5)  # Paddle's Linear layout (in, out)
    assert shapes["bn_old._variance"] == (5,)
    assert len(state) == 21
    assert all(t.dtype == torch.float32 for t in state.values())


class Net(nn.Module):
    """The model of shared/data/paddle/README.md: torch convs, syncbn.paddle_compat norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNorm2D(8, momentum=0.8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = BatchNorm2D(4, data_format="NHWC", epsilon=1e-3)
        self.fc = nn.Linear(4, 5)
        self.bn3 = BatchNorm1D(5, weight_attr=False)
        self.bn_old = BatchNorm(5, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x))).permute(0, 2, 3, 1)  # NCHW -> NHWC
        h = self.conv2(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # conv in NHWC
        h = self.bn2(h).mean(dim=(1, 2))
        return self.bn_old(self.bn3(self.fc(h)))  # bn_old applies its act='relu'


@needs_data
def test_real_file_reproduces_paddle_output() -> None:
    model = Net().eval()
    state = paddle_to_torch_state_dict(load_pdparams(DATA / "net.pdparams"), model)
    model.load_state_dict(state, strict=True)
    io = np.load(DATA / "net_eval_io.npz")
    with torch.no_grad():
        y = model(torch.from_numpy(io["x"]))
    torch.testing.assert_close(y, torch.from_numpy(io["y"]), rtol=1e-5, atol=1e-5)


# --- the restricted unpickler on pickles built here ------------------------------------------


ARRAYS = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f16": np.array([0.5, -2.0], dtype=np.float16),
    "f64_big_endian": np.array([1.5, 2.5], dtype=">f8"),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    "i64": np.array([[-1, 2]], dtype=np.int64),
    "bool": np.array([True, False]),
    "scalar_array": np.array(3.0, dtype=np.float32),
    "bf16_as_u16": np.array([0x3F80, 0x4000], dtype=np.uint16),  # 1.0, 2.0 in bfloat16
}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_roundtrip_numpy_arrays(tmp_path: Path, protocol: int) -> None:
    saved = {**ARRAYS, "np_scalar": np.float64(2.5), STRUCTURE_KEY: {"f32": "linear_0.w_0"}}
    state = load_pdparams(_write(tmp_path, saved, protocol))
    assert set(state) == set(ARRAYS) | {"np_scalar"}
    for key, array in ARRAYS.items():
        expected = torch.from_numpy(array.astype(array.dtype.newbyteorder("=")))
        assert state[key].dtype == expected.dtype, key
        assert torch.equal(state[key], expected), key
    assert state["np_scalar"].item() == 2.5
    assert state["np_scalar"].shape == ()
    assert state["bf16_as_u16"].view(torch.bfloat16).tolist() == [1.0, 2.0]


def test_numpy1_module_path_loads_without_warning(tmp_path: Path) -> None:
    # numpy 1.x writes numpy.core.multiarray; numpy 2 warns on importing numpy.core.
    data = pickle.dumps({"w": ARRAYS["f32"]}, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "old.pdparams"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(load_pdparams(path)["w"], torch.from_numpy(ARRAYS["f32"]))


def test_ordered_dict_and_path_string(tmp_path: Path) -> None:
    path = _write(tmp_path, OrderedDict(b=np.zeros(1), a=np.ones(1)))
    assert list(load_pdparams(str(path))) == ["b", "a"]


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_refuses_os_system_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path, {"w": np.zeros(2), "x": _Exploit(f"touch {marker}")})
    with pytest.raises(
        UnsafePickleError,
        match=r"refused to load global '(posix|nt|os)\.system' from .*x\.pdparams",
    ):
        load_pdparams(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
        (b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.", "builtins.getattr"),
        (b"cnumpy\nload\n(S'/etc/passwd'\ntR.", "numpy.load"),
        (b"csubprocess\ncheck_output\n((S'id'\nltR.", "subprocess.check_output"),
    ],
    ids=["eval", "getattr", "numpy-load", "subprocess"],
)
def test_refuses_other_globals(tmp_path: Path, payload: bytes, refused: str) -> None:
    path = tmp_path / "evil.pdparams"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=rf"refused to load global '{refused}'"):
        load_pdparams(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pdparams"
    with pytest.raises(FileNotFoundError, match=rf"no file at '{missing}'"):
        load_pdparams(missing)


def test_missing_suffix_hint(tmp_path: Path) -> None:
    _write(tmp_path, {"w": np.zeros(1)}, name="model.pdparams")
    with pytest.raises(
        FileNotFoundError, match=r"'.*model\.pdparams' exists: pass the full file name"
    ):
        load_pdparams(tmp_path / "model")


@pytest.mark.parametrize("content", [b"", b"not a pickle at all"], ids=["empty", "garbage"])
def test_not_a_pickle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pdparams"
    path.write_bytes(content)
    with pytest.raises(pickle.UnpicklingError, match=r"is not a readable pickle"):
        load_pdparams(path)


def test_not_a_dict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"to hold a dict \(a state dict\), got list"):
        load_pdparams(_write(tmp_path, [np.zeros(1)]))


def test_non_array_entry(tmp_path: Path) -> None:
    path = _write(tmp_path, {"w": np.zeros(1), "LR_Scheduler": {"last_epoch": 3}})
    with pytest.raises(ValueError, match=r"'LR_Scheduler' holds a dict.*not an optimizer \.pdopt"):
        load_pdparams(path)


def test_object_array(tmp_path: Path) -> None:
    path = _write(tmp_path, {"w": np.array([1, "a"], dtype=object)})
    with pytest.raises(ValueError, match=r"entry 'w' .* array of Python objects"):
        load_pdparams(path)


def test_clear_error_without_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"w": np.zeros(1)})
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ImportError, match=r"needs numpy .* Fix: pip install numpy"):
        load_pdparams(path)


# --- paddle_to_torch_state_dict ----------------------------------------------------------------


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Linear(3, 3)
        self.rect = nn.Linear(3, 2)
        self.table = nn.Embedding(4, 3)


def _paddle_state(model: Head) -> dict[str, torch.Tensor]:
    state = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    for key in ("square.weight", "rect.weight"):
        state[key] = state[key].t().contiguous()  # what Paddle stores: (in, out)
    return state


def test_transposes_linear_weights_only() -> None:
    model = Head()
    paddle_state = _paddle_state(model)
    converted = paddle_to_torch_state_dict(paddle_state, model)
    assert torch.equal(converted["square.weight"], paddle_state["square.weight"].t())
    assert torch.equal(converted["rect.weight"], paddle_state["rect.weight"].t())
    assert converted["rect.weight"].is_contiguous()
    assert converted["table.weight"] is paddle_state["table.weight"]  # same layout in both
    assert converted["rect.bias"] is paddle_state["rect.bias"]
    model.load_state_dict(converted)
    assert torch.equal(model.rect.weight.detach(), paddle_state["rect.weight"].t())


def test_explicit_transpose_keys_and_predicate() -> None:
    model = Head()
    state = {"table.weight": torch.randn(3, 4)}
    by_keys = paddle_to_torch_state_dict(state, model, transpose=["table.weight"])
    by_predicate = paddle_to_torch_state_dict(state, model, transpose=lambda k: k.startswith("t"))
    assert torch.equal(by_keys["table.weight"], state["table.weight"].t())
    assert torch.equal(by_predicate["table.weight"], state["table.weight"].t())


def test_unknown_keys_pass_through() -> None:
    extra = {"not.in.model": torch.ones(2, 5)}
    assert paddle_to_torch_state_dict(extra, Head())["not.in.model"] is extra["not.in.model"]


def test_shape_mismatch_is_explained() -> None:
    state = {"rect.weight": torch.randn(2, 3)}  # already torch layout: transposing breaks it
    with pytest.raises(
        ValueError,
        match=r"'rect.weight' has shape \(2, 3\) \(transposed: \(3, 2\)\) .* expects \(2, 3\)",
    ):
        paddle_to_torch_state_dict(state, Head())


def test_transpose_needs_2d() -> None:
    with pytest.raises(ValueError, match=r"cannot transpose 'rect.bias' of shape \(2,\)"):
        paddle_to_torch_state_dict({"rect.bias": torch.zeros(2)}, Head(), transpose=["rect.bias"])


# --- pickles that expand: memo references, shared buffers, codecs, non-numeric arrays -------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_array_referenced_many_times_is_built_once(tmp_path: Path, protocol: int) -> None:
    # the 10 MB file referencing one array 2000 times, scaled down: 512 KiB x 64
    array = np.arange(1 << 16, dtype=np.float64)
    state = load_pdparams(_write(tmp_path, {f"k{i}": array for i in range(64)}, protocol))
    assert len(state) == 64
    assert all(tensor is state["k0"] for tensor in state.values())
    assert torch.equal(state["k0"], torch.from_numpy(array))


class _ArrayOnSharedBytes:
    """Pickles as a numpy array whose raw bytes are one object shared by every instance."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __reduce__(self) -> tuple[object, ...]:
        reconstruct, args, state = np.zeros(1).__reduce__()
        shape = (len(self.raw) // 8,)
        return reconstruct, args, (state[0], shape, np.dtype(np.float64), False, self.raw)


@pytest.mark.parametrize("protocol", [2, 4])
def test_distinct_arrays_on_one_stored_buffer_are_refused(tmp_path: Path, protocol: int) -> None:
    raw = np.arange(1 << 15, dtype=np.float64).tobytes()  # 256 KiB, stored once in the file
    path = _write(tmp_path, {f"k{i}": _ArrayOnSharedBytes(raw) for i in range(64)}, protocol)
    assert path.stat().st_size < 2 * len(raw)  # 64 arrays (16 MiB) from a 0.5 MiB file
    with pytest.raises(ValueError, match=r"builds more than \d+ bytes \(4 × its \d+ bytes "
                                         r"\+ 1 MiB\) while rebuilding an array: it references "
                                         r"the same data many times.*Fix: load only files"):
        load_pdparams(path)


def _encode_bomb(copies: int, length: int) -> bytes:
    """Protocol 2: ``{k0: encode(s, 'latin1'), k1: <the same call>, ...}``, ``s`` stored once."""
    def text(value: bytes) -> bytes:
        return b"X" + len(value).to_bytes(4, "little") + value

    out = b"\x80\x02}q\x00(" + text(b"k0") + b"c_codecs\nencode\nq\x01"
    out += text(b"a" * length) + b"q\x02" + text(b"latin1") + b"q\x03\x86R"
    for i in range(1, copies):
        out += text(f"k{i}".encode()) + b"h\x01h\x02h\x03\x86R"
    return out + b"u."


def test_one_stored_string_decoded_many_times_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pdparams"
    path.write_bytes(_encode_bomb(copies=64, length=1 << 18))
    with pytest.raises(ValueError, match=r"builds more than .* while decoding a byte string"):
        load_pdparams(path)


class _Encode:
    def __init__(self, codec: str) -> None:
        self.codec = codec

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return codecs.encode, ("abc", self.codec)


@pytest.mark.parametrize("codec", ["no-such-codec", "rot13", "utf-16"])
def test_codec_other_than_latin1_is_a_clear_error(tmp_path: Path, codec: str) -> None:
    path = _write(tmp_path, {"w": _Encode(codec)}, protocol=2)
    with pytest.raises(ValueError, match=rf"asks to encode with codec '{codec}'; a file written "
                                         r"by paddle.save only uses 'latin1'"):
        load_pdparams(path)


@pytest.mark.parametrize(
    "array",
    [np.array(["a", "bc"]), np.array([b"a"]), np.array(["2024-01-01"], dtype="datetime64[D]"),
     np.zeros(2, dtype="V4"), np.zeros(2, dtype=np.longdouble)],
    ids=["str", "bytes", "datetime64", "void", "longdouble"],
)
def test_non_numeric_array_is_a_clear_error(tmp_path: Path, array: np.ndarray) -> None:
    path = _write(tmp_path, {"ok": np.zeros(1), "w": array})
    dtype = re.escape(str(array.dtype))
    with pytest.raises(ValueError, match=rf"entry 'w' of .* array of dtype {dtype}.*"
                                         r"supported: bool, int8.*Fix: save"):
        load_pdparams(path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_large_real_arrays_stay_within_the_bound(tmp_path: Path, protocol: int) -> None:
    # protocol 2 stores bytes as latin1 text: the file is 1-2x the data, decoding copies it once
    arrays = {f"w{i}": np.random.default_rng(i).standard_normal(1 << 19) for i in range(3)}
    state = load_pdparams(_write(tmp_path, arrays, protocol))
    for key, array in arrays.items():
        assert torch.equal(state[key], torch.from_numpy(array))


class _UnfilledArray:
    """Pickles as numpy's ``_reconstruct(ndarray, shape, 'b')`` with no state to fill it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __reduce__(self) -> tuple[object, ...]:
        reconstruct, args, _ = np.zeros(1).__reduce__()
        return reconstruct, (args[0], (self.size,), args[2])


def test_array_allocated_but_never_filled_is_refused(tmp_path: Path) -> None:
    small = _write(tmp_path, {"w": _UnfilledArray(16)}, name="small.pdparams")
    with pytest.raises(ValueError, match=r"entry 'w' of .* values the file never gives .* "
                                         r"uninitialized memory"):
        load_pdparams(small)
    large = _write(tmp_path, {"w": _UnfilledArray(1 << 26)}, name="large.pdparams")
    with pytest.raises(ValueError, match=r"builds more than .* while allocating an array"):
        load_pdparams(large)
@needs_data
@pytest.mark.parametrize("order", ["convert-then-load", "load-then-convert"])
def test_readme_quick_start_convert_and_load(order: str) -> None:
    """README's Paddle quick start on the real file: convert_sync_batchnorm, load_pdparams,
    paddle_to_torch_state_dict, load_state_dict; in either order, Paddle's eval output."""
    model = Net()
    keys = list(model.state_dict())
    state = load_pdparams(DATA / "net.pdparams")
    if order == "convert-then-load":
        model = SyncBatchNorm.convert_sync_batchnorm(model)
        assert list(model.state_dict()) == keys  # no frozen bn3.weight appears
        model.load_state_dict(paddle_to_torch_state_dict(state, model))
    else:
        model.load_state_dict(paddle_to_torch_state_dict(state, model))
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model.bn1, SyncBatchNorm) and isinstance(model.bn3, SyncBatchNorm)
    assert model.bn3.weight is None and isinstance(model.bn_old, BatchNorm)
    io = np.load(DATA / "net_eval_io.npz")
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(io["x"]))
    torch.testing.assert_close(y, torch.from_numpy(io["y"]), rtol=1e-5, atol=1e-5)


# --- allocations a few bytes ask for: charged before numpy allocates (issue 19, item 15) -----

_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.arange(1).__reduce_ex__(5)[0]
_HUGE = 1 << 36
"""64 Gi elements: before the fix numpy's MemoryError ("Unable to allocate 64.0 GiB")."""


class _NdarrayCall:
    """Pickles as ``numpy.ndarray(shape, dtype)`` called directly (paddle.save never does)."""

    def __init__(self, shape: tuple[int, ...], dtype: str = "u1") -> None:
        self.shape, self.dtype = shape, dtype

    def __reduce__(self) -> tuple[object, ...]:
        return np.ndarray, (self.shape, np.dtype(self.dtype))


class _ObjectState:
    """An array whose BUILD state asks for ``_HUGE`` object slots (numpy allocates first)."""

    def __init__(self, via_buffer: bool) -> None:
        self.via_buffer = via_buffer

    def __reduce__(self) -> tuple[object, ...]:
        state = (1, (_HUGE,), np.dtype("O"), False, [])
        if self.via_buffer:  # protocol 5's _frombuffer view, then the state
            return _FROMBUFFER, (bytearray(8), np.dtype("u1"), (8,), "C"), state
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), state


# numpy.ndarray((2**36,)) through NEWOBJ: ``cls.__new__(cls, *args)``, float64 (512 GiB)
_NEWOBJ_BOMB = (b"\x80\x02}X\x01\x00\x00\x00wcnumpy\nndarray\n(\x8a\x05\x00\x00\x00\x00\x10"
                b"\x85t\x81s.")


@pytest.mark.parametrize(("payload", "protocol", "what"), [
    (_NdarrayCall((_HUGE,)), 2, r"allocating an array \(numpy\.ndarray\)"),
    (_NEWOBJ_BOMB, None, r"allocating an array \(numpy\.ndarray\)"),
    (_ObjectState(via_buffer=False), 2, r"rebuilding an array"),
    (_ObjectState(via_buffer=True), 5, r"rebuilding an array"),
], ids=["ndarray-call", "ndarray-newobj", "reconstruct-object-state", "frombuffer-object-state"])
def test_small_file_asking_for_a_huge_array_is_refused_before_allocating(
        tmp_path: Path, payload: object, protocol: int | None, what: str) -> None:
    """Before: numpy's MemoryError (64 GiB, 512 GiB, or an empty one for object states)."""
    path = tmp_path / "bomb.pdparams"
    path.write_bytes(payload if isinstance(payload, bytes)
                     else pickle.dumps({"w": payload}, protocol=protocol))
    assert path.stat().st_size < 256
    with pytest.raises(ValueError, match=rf"builds more than \d+ bytes \(4 × its \d+ bytes \+ "
                                         rf"1 MiB\) while {what}: .*before allocating\. Fix: "
                                         r"load only files written by paddle\.save"):
        load_pdparams(path)


def test_ndarray_called_without_values_is_refused_as_uninitialized(tmp_path: Path) -> None:
    """Before: loaded as a tensor of whatever the freshly allocated memory held."""
    path = _write(tmp_path, {"w": _NdarrayCall((16,), "f8")}, protocol=2)
    with pytest.raises(ValueError, match=r"entry 'w' of .* values the file never gives .* "
                                         r"uninitialized memory"):
        load_pdparams(path)


class _FilledByState:
    """``numpy.ndarray((0,))`` then a BUILD state with the values: a complete array."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __reduce__(self) -> tuple[object, ...]:
        state = (1, self.values.shape, self.values.dtype, False, self.values.tobytes())
        return np.ndarray, ((0,), self.values.dtype), state


def test_ndarray_call_filled_by_its_state_still_loads(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float32)
    state = load_pdparams(_write(tmp_path, {"w": _FilledByState(values)}, protocol=2))
    assert torch.equal(state["w"], torch.from_numpy(values))


class _OrderedFrom:
    def __init__(self, arg: object) -> None:
        self.arg = arg

    def __reduce__(self) -> tuple[object, ...]:
        return OrderedDict, (self.arg,)


def test_ordered_dict_from_pairs_loads_and_from_an_array_is_refused(tmp_path: Path) -> None:
    """Python 2 pickled an OrderedDict from a list of pairs; iterating anything else (an
    array view) could build millions of objects from a few bytes."""
    pairs = _write(tmp_path, _OrderedFrom([["w", np.ones(2)]]), protocol=2, name="pairs.pdparams")
    assert torch.equal(load_pdparams(pairs)["w"], torch.ones(2, dtype=torch.float64))
    view = _write(tmp_path, _OrderedFrom(np.zeros((4, 2))), protocol=2, name="view.pdparams")
    with pytest.raises(ValueError, match=r"builds an OrderedDict from _PendingArray; a pickled "
                                         r"OrderedDict is built empty \(or from a list of "
                                         r"pairs\)"):
        load_pdparams(view)
