"""Read ``.pdparams`` files without Paddle, and map a Paddle state dict onto a torch model.

``paddle.save(layer.state_dict(), path)`` writes a pickle (protocol 2–4) of a dict:
parameter name → numpy array, plus the bookkeeping entry
``"StructuredToParameterName@@"`` (structured name → Paddle's internal name).
:func:`load_pdparams` unpickles it with an allow-list, so a file cannot run code:
the only globals it may name are the ones numpy arrays are rebuilt from (listed in
``_allowed_globals``); anything else raises :class:`UnsafePickleError` naming it.

A pickle can also be small and *expand*: its memo lets one stored array, string or
byte string be referenced any number of times, and a few bytes can ask numpy for
an array of any shape. So the loader builds each referenced object once (an array
referenced by 2000 keys becomes one tensor shared by those keys), and charges the
bytes every allow-listed call would build (decoded byte strings, arrays — by the
shape and dtype they ask for, *before* numpy allocates them —, numpy scalars,
tensors) to one budget: a file written by ``paddle.save`` stores every array's bytes
once, so for it that count stays below ``3 × file size``; above
``EXPANSION_LIMIT × file size + 1 MiB`` the loader stops with a ``ValueError``.

Recipe::

    state = load_pdparams("net.pdparams")                    # name -> torch.Tensor
    model.load_state_dict(paddle_to_torch_state_dict(state, model))

numpy is needed only here, and imported only when a file is read.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EXPANSION_LIMIT",
    "STRUCTURE_KEY",
    "UnsafePickleError",
    "load_pdparams",
    "paddle_to_torch_state_dict",
]

STRUCTURE_KEY = "StructuredToParameterName@@"
"""Paddle's bookkeeping entry in a saved state dict; not a tensor, skipped on load."""


EXPANSION_LIMIT = 4
"""``load_pdparams`` builds at most this many times the file's size (plus 1 MiB)."""

_SLACK_BYTES = 1 << 20

_CODECS = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")
"""The codecs a protocol-2 pickle of ``bytes`` uses (``_codecs.encode(str, "latin1")``)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.pdparams`` file named a global outside the allow-list; nothing was executed."""


class _RefusedContentError(ValueError):
    """A readable pickle whose content a state dict never has; raised as is, not re-wrapped."""


class _Budget:
    """The bytes one load may build: ``EXPANSION_LIMIT × file size + 1 MiB`` (module docstring)."""

    def __init__(self, file_size: int, source: str) -> None:
        self.limit = EXPANSION_LIMIT * file_size + _SLACK_BYTES
        self.file_size = file_size
        self.used = 0
        self.source = source

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise _RefusedContentError(
                f"load_pdparams: {self.source} builds more than {self.limit} bytes "
                f"({EXPANSION_LIMIT} × its {self.file_size} bytes + 1 MiB) while {what}: it "
                "references the same data many times or asks for more memory than it "
                "stores, which a file written by paddle.save never does (it stores each "
                "array's bytes once), so loading stopped here, before allocating. "
                "Fix: load only files written by paddle.save(layer.state_dict(), path)."
            )


def _import_numpy() -> ModuleType:
    try:
        return importlib.import_module("numpy")
    except ImportError as exc:
        raise ImportError(
            "load_pdparams needs numpy to rebuild the arrays in a .pdparams file, and numpy "
            "is not installed. Fix: pip install numpy"
        ) from exc


def _array_bytes(np: ModuleType, shape: object, dtype: object, source: str) -> int:
    """The bytes numpy would allocate for ``shape`` and ``dtype`` (a pickle's arguments).

    Raises ``_RefusedContentError`` when they are not a shape and a dtype numpy could
    build from: then nothing is allocated, and no budget can be checked.
    """
    try:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)  # type: ignore[arg-type]
        count = math.prod(int(dim) for dim in dims)
        itemsize = int(np.dtype(dtype).itemsize)
    except Exception as exc:
        raise _RefusedContentError(
            f"load_pdparams: {source} asks numpy for an array of shape {shape!r} and dtype "
            f"{dtype!r}, which is not one numpy writes ({exc}). Fix: load only files "
            "written by paddle.save(layer.state_dict(), path)."
        ) from None
    return max(count, 0) * itemsize


class _PendingArray:
    """An array that numpy's pickle fills at BUILD; every allocation is charged first.

    numpy rebuilds an array in two steps, ``_reconstruct(ndarray, (0,), b"b")`` then
    ``array.__setstate__((version, shape, dtype, is_fortran, raw))``, which allocates
    ``shape × dtype`` (for an object dtype before it looks at ``raw``: 512 GiB for a
    few bytes of pickle). The state's size is charged to the budget before numpy sees
    it. ``array`` is the built array (``None`` until filled); :func:`_to_tensor` takes
    it out.
    """

    def __init__(self, make: Callable[[], Any], budget: _Budget, np: ModuleType,
                 array: Any = None) -> None:
        self._make = make
        self._budget = budget
        self._np = np
        self.array: Any = array

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise _RefusedContentError(
                f"load_pdparams: {self._budget.source} fills an array with a state that is "
                f"not numpy's (shape, dtype, is_fortran, data) tuple (got a "
                f"{type(state).__name__}). Fix: load only files written by "
                "paddle.save(layer.state_dict(), path)."
            )
        self._budget.charge(_array_bytes(self._np, state[-4], state[-3], self._budget.source),
                            "rebuilding an array")
        array = self._make() if self.array is None else self.array
        array.__setstate__(state)
        self.array = array


def _allowed_globals(np: ModuleType, budget: _Budget, source: str) -> dict[tuple[str, str], Any]:
    """(module, name) → object, for every global a numpy-array pickle may name.

    The numpy helpers are taken from numpy's own ``__reduce__`` results rather than
    imported by path: their module moved from ``numpy.core`` (numpy 1) to
    ``numpy._core`` (numpy 2, where importing ``numpy.core`` warns), and files from
    either must load under either. Every entry that can allocate is wrapped to
    charge ``budget`` *before* it allocates (module docstring): ``numpy.ndarray``
    (called or given to ``_reconstruct``), ``_reconstruct``, ``scalar``, the state
    that fills an array (:class:`_PendingArray`, also around ``_frombuffer``'s
    views), ``_codecs.encode`` (which only takes protocol 2's ``(str, "latin1")``);
    ``OrderedDict`` is only built empty or from a list of pairs, as pickles build it.
    """
    reconstruct = np.arange(1).__reduce__()[0]  # protocols 2-4
    frombuffer = np.arange(1).__reduce_ex__(5)[0]  # protocol 5
    numpy_scalar = np.float32(0).__reduce__()[0]  # numpy scalars
    codecs_encode = importlib.import_module("_codecs").encode

    class NdarrayCall:
        """``numpy.ndarray`` as the pickle names it: the subtype ``_reconstruct`` is given
        (see ``reconstruct_pending``), or called itself (REDUCE, NEWOBJ), which
        ``paddle.save`` never does. A call is charged ``shape × dtype`` before anything
        is allocated and returns a pending array (uninitialized memory unless a state
        fills it); with a ``buffer`` it is a view of bytes the file already holds."""

        def __new__(cls, shape: object = (), dtype: object = float, buffer: object = None,
                    *args: object, **kwargs: object) -> Any:
            if buffer is not None:  # a view: nothing new is allocated
                view = np.ndarray(shape, dtype, buffer, *args, **kwargs)
                return _PendingArray(lambda: view, budget, np, array=view)
            budget.charge(_array_bytes(np, shape, dtype, source),
                          "allocating an array (numpy.ndarray)")
            return _PendingArray(lambda: np.ndarray(shape, dtype, None, *args, **kwargs),
                                 budget, np)

    def encode(text: object, encoding: object = "utf-8", *errors: object) -> Any:
        if not (isinstance(encoding, str) and encoding.lower() in _CODECS):
            raise _RefusedContentError(
                f"load_pdparams: {source} asks to encode with codec {encoding!r}; a file "
                "written by paddle.save only uses 'latin1' (protocol 2 stores bytes as "
                "_codecs.encode(text, 'latin1')). Fix: load only files written by "
                "paddle.save(layer.state_dict(), path)."
            )
        if not isinstance(text, str):
            raise _RefusedContentError(
                f"load_pdparams: {source} asks to encode a {type(text).__name__}; protocol 2 "
                "only encodes a str (_codecs.encode(text, 'latin1')). Fix: load only files "
                "written by paddle.save(layer.state_dict(), path)."
            )
        budget.charge(len(text), "decoding a byte string")
        return codecs_encode(text, encoding, *errors)

    def reconstruct_pending(subtype: object, *args: Any) -> _PendingArray:
        # numpy's pickles allocate shape (0,) here; a larger shape is memory too
        if subtype is NdarrayCall:
            subtype = np.ndarray
        if len(args) != 2:
            raise _RefusedContentError(
                f"load_pdparams: {source} calls numpy's _reconstruct with {len(args) + 1} "
                "arguments; numpy writes (ndarray, shape, dtype). Fix: load only files "
                "written by paddle.save(layer.state_dict(), path)."
            )
        budget.charge(_array_bytes(np, args[0], args[1], source), "allocating an array")
        return _PendingArray(lambda: reconstruct(subtype, *args), budget, np)

    def scalar(dtype: Any, *args: object) -> Any:
        if not isinstance(dtype, np.dtype):  # numpy's own error, before any allocation
            return numpy_scalar(dtype, *args)
        budget.charge(int(dtype.itemsize), "rebuilding a numpy scalar")
        return numpy_scalar(dtype, *args)

    def from_buffer(buffer: object, *args: object) -> _PendingArray:
        # a view of bytes the file holds (charged when it becomes a tensor); a later BUILD
        # on it would allocate, so it is wrapped like the others
        view = frombuffer(buffer, *args)
        return _PendingArray(lambda: view, budget, np, array=view)

    def ordered_dict(*args: object, **kwargs: object) -> OrderedDict[Any, Any]:
        # Python 3 pickles an OrderedDict empty, then fills it item by item (SETITEMS);
        # Python 2 passed a list of [key, value] pairs. Those are built by the pickle's own
        # opcodes (bounded by its size); iterating anything else (an array view) could build
        # millions of objects from a few bytes
        if kwargs or len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
            raise _RefusedContentError(
                f"load_pdparams: {source} builds an OrderedDict from "
                f"{type(args[0]).__name__ if args else 'keywords'}; a pickled OrderedDict is "
                "built empty (or from a list of pairs). Fix: load only files written by "
                "paddle.save(layer.state_dict(), path)."
            )
        return OrderedDict(*args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): NdarrayCall,
        ("numpy", "dtype"): np.dtype,  # builds a description, never array memory
        # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): encode,
        ("collections", "OrderedDict"): ordered_dict,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct_pending
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = from_buffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only returns allow-listed objects."""

    def __init__(self, file: Any, allowed: Mapping[tuple[str, str], Any], source: str) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"load_pdparams: refused to load global '{module}.{name}' from "
                f"{self._source}: a state dict saved by paddle.save holds only numpy "
                f"arrays, which need only {sorted(f'{m}.{n}' for m, n in self._allowed)}. "
                "Nothing was executed. Fix: load only files from paddle.save(state_dict); "
                "if you trust this file and need its other objects, use pickle yourself."
            ) from None


_TORCH_DTYPES = (
    "bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float16, float32, "
    "float64, complex64 and complex128 (bfloat16 is saved as uint16)"
)


def _to_tensor(np: ModuleType, key: str, value: object, source: str, budget: _Budget) -> Tensor:
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise ValueError(
                f"load_pdparams: entry {key!r} of {source} is an array whose values the file "
                "never gives (numpy's _reconstruct without the state that fills it), so it "
                "would be uninitialized memory. Fix: pass a file written by "
                "paddle.save(layer.state_dict(), path)."
            )
        value = value.array
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise ValueError(
            f"load_pdparams: expected every entry of {source} to be an array, but "
            f"{key!r} holds a {type(value).__name__}. Fix: pass a file written by "
            "paddle.save(layer.state_dict(), path) (not an optimizer .pdopt file)."
        )
    if value.dtype.hasobject:
        raise ValueError(
            f"load_pdparams: entry {key!r} of {source} is an array of Python objects "
            f"(dtype {value.dtype}), which has no tensor equivalent. Fix: save numeric arrays."
        )
    if value.dtype.kind not in "biufc":
        raise ValueError(
            f"load_pdparams: entry {key!r} of {source} is an array of dtype {value.dtype} "
            f"(kind {value.dtype.kind!r}), which has no tensor equivalent; supported: "
            f"{_TORCH_DTYPES}. Fix: save numeric arrays."
        )
    budget.charge(int(value.nbytes), f"converting entry {key!r} to a tensor")
    native = value.astype(value.dtype.newbyteorder("="), order="C", copy=True)
    try:
        return torch.from_numpy(native)
    except TypeError:
        raise ValueError(
            f"load_pdparams: entry {key!r} of {source} is an array of dtype {value.dtype}, "
            f"which torch cannot hold; supported: {_TORCH_DTYPES}. Fix: save it as one of those."
        ) from None


def load_pdparams(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a file written by ``paddle.save(state_dict, path)`` into ``name -> torch.Tensor``.

    Safe on untrusted files: it runs no code and builds at most
    ``EXPANSION_LIMIT × file size + 1 MiB`` bytes (see the module docstring). The
    tensors keep the arrays' dtypes and shapes (a Paddle ``Linear`` weight is
    ``(in, out)``; see :func:`paddle_to_torch_state_dict`); keys that refer to one
    array in the file get one shared tensor. Paddle saves bfloat16 tensors as
    ``uint16`` arrays; reinterpret those with ``tensor.view(torch.bfloat16)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImportError: numpy is not installed.
        UnsafePickleError: the pickle names a global outside the allow-list.
        pickle.UnpicklingError: the file is not a readable pickle.
        ValueError: the pickle is not a dict of numeric arrays, uses a codec other than
            protocol 2's ``latin1``, or would build more than the bound above.
    """
    file = Path(path)
    if not file.is_file():
        hint = ""
        if Path(f"{file}.pdparams").is_file():
            hint = f" ('{file}.pdparams' exists: pass the full file name)"
        raise FileNotFoundError(
            f"load_pdparams: no file at '{file}'{hint}. "
            "Fix: pass the path of a file written by paddle.save(layer.state_dict(), path)."
        )
    np = _import_numpy()
    source = f"'{file}'"
    budget = _Budget(file.stat().st_size, source)
    with file.open("rb") as stream:
        try:
            loaded = _RestrictedUnpickler(stream, _allowed_globals(np, budget, source),
                                          source).load()
        except (UnsafePickleError, _RefusedContentError):
            raise
        except (
            pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError,
            TypeError, ValueError,
        ) as exc:  # fmt: skip
            raise pickle.UnpicklingError(
                f"load_pdparams: {source} is not a readable pickle ({exc}). "
                "Fix: pass a file written by paddle.save(layer.state_dict(), path)."
            ) from exc
    if not isinstance(loaded, dict):
        raise ValueError(
            f"load_pdparams: expected {source} to hold a dict (a state dict), got "
            f"{type(loaded).__name__}. Fix: save with paddle.save(layer.state_dict(), path)."
        )
    built: dict[int, Tensor] = {}  # id of the loaded object -> its tensor, built once
    state: dict[str, Tensor] = {}
    for key, value in loaded.items():
        if key == STRUCTURE_KEY:
            continue
        if id(value) not in built:  # ``loaded`` keeps every value alive: ids stay unique
            built[id(value)] = _to_tensor(np, str(key), value, source, budget)
        state[str(key)] = built[id(value)]
    return state


def _linear_weight_keys(model: nn.Module) -> set[str]:
    return {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def paddle_to_torch_state_dict(
    state: Mapping[str, Tensor],
    model: nn.Module,
    *,
    transpose: Iterable[str] | Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Map a Paddle state dict onto ``model``'s layout: transpose what Paddle stores transposed.

    Paddle's ``Linear`` stores its weight as ``(in, out)``, torch's as ``(out, in)``;
    every other layer this package meets (conv, BatchNorm, embedding) uses the same
    layout in both. So by default the weights of ``model``'s ``nn.Linear`` modules
    (found by type, which also covers square weights) are transposed and everything
    else is passed through unchanged. Names are not translated: the Paddle-flavour
    layers of this package use Paddle's (``_mean``, ``_variance``); load the result
    with ``model.load_state_dict``, which reports missing and unexpected keys.

    Args:
        state: Paddle name → tensor (e.g. from :func:`load_pdparams`).
        model: the torch model the state is for.
        transpose: which 2-D entries to transpose instead of the Linear weights: the
            keys themselves, or a predicate on the key.

    Returns:
        A new dict with the same keys; transposed entries are contiguous copies.

    Raises:
        ValueError: an entry to transpose is not 2-D, or an entry's shape (after
            transposing) differs from the model's.
    """
    if transpose is None:
        selected = _linear_weight_keys(model)
        should_transpose: Callable[[str], bool] = selected.__contains__
    elif callable(transpose):
        should_transpose = transpose
    else:
        selected = set(transpose)
        should_transpose = selected.__contains__
    expected = model.state_dict()
    result: dict[str, Tensor] = {}
    for key, tensor in state.items():
        flipped = should_transpose(key)
        if flipped:
            if tensor.dim() != 2:
                raise ValueError(
                    f"paddle_to_torch_state_dict: cannot transpose {key!r} of shape "
                    f"{tuple(tensor.shape)}: only 2-D (Linear) weights are transposed. "
                    "Fix: leave it out of transpose=."
                )
            tensor = tensor.t().contiguous()
        target = expected.get(key)
        if target is not None and target.shape != tensor.shape:
            shown = f"{tuple(state[key].shape)}"
            if flipped:
                shown += f" (transposed: {tuple(tensor.shape)})"
            raise ValueError(
                f"paddle_to_torch_state_dict: {key!r} has shape {shown} in the Paddle state "
                f"but the model expects {tuple(target.shape)}. Fix: build the model with the "
                "same sizes as the Paddle one, or list in transpose= the 2-D entries that "
                "Paddle stores as (in, out)."
            )
        result[key] = tensor
    return result
