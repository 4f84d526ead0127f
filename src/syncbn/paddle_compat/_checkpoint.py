"""Read ``.pdparams`` files without Paddle, and map a Paddle state dict onto a torch model.

``paddle.save(layer.state_dict(), path)`` writes a pickle (protocol 2–4) of a dict:
parameter name → numpy array, plus the bookkeeping entry
``"StructuredToParameterName@@"`` (structured name → Paddle's internal name).
:func:`load_pdparams` unpickles it with an allow-list, so a file cannot run code:
the only globals it may name are the ones numpy arrays are rebuilt from (listed in
``_allowed_globals``); anything else raises :class:`UnsafePickleError` naming it.

A pickle can also be small and *expand*: its memo lets one stored array, string or
byte string be referenced any number of times. So the loader builds each
referenced object once (an array referenced by 2000 keys becomes one tensor shared
by those keys), and counts the bytes it builds (decoded byte strings, array
copies, tensors): a file written by ``paddle.save`` stores every array's bytes
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
        self._source = source

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise _RefusedContentError(
                f"load_pdparams: {self._source} builds more than {self.limit} bytes "
                f"({EXPANSION_LIMIT} × its {self.file_size} bytes + 1 MiB) while {what}: it "
                "references the same data many times, which a file written by paddle.save "
                "never does (it stores each array once), so loading stopped here. "
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


class _PendingArray:
    """What the pickle's ``_reconstruct`` returns here: an array built at BUILD, and charged.

    numpy rebuilds an array in two steps, ``_reconstruct(ndarray, (0,), b"b")`` then
    ``array.__setstate__((version, shape, dtype, is_fortran, raw))``, which copies
    ``raw``; the copy is counted against the budget. :func:`_unwrap` takes the array out.
    """

    def __init__(self, make: Callable[[], Any], budget: _Budget) -> None:
        self._make = make
        self._budget = budget
        self.array: Any = None

    def __setstate__(self, state: object) -> None:
        array = self._make()
        array.__setstate__(state)
        self._budget.charge(int(array.nbytes), "rebuilding an array")
        self.array = array


def _allowed_globals(np: ModuleType, budget: _Budget, source: str) -> dict[tuple[str, str], Any]:
    """(module, name) → object, for every global a numpy-array pickle may name.

    The numpy helpers are taken from numpy's own ``__reduce__`` results rather than
    imported by path: their module moved from ``numpy.core`` (numpy 1) to
    ``numpy._core`` (numpy 2, where importing ``numpy.core`` warns), and files from
    either must load under either. The helpers that build data are wrapped to
    charge ``budget`` (module docstring); ``_codecs.encode`` only takes protocol 2's
    ``(str, "latin1")``.
    """
    reconstruct = np.arange(1).__reduce__()[0]  # protocols 2-4
    frombuffer = np.arange(1).__reduce_ex__(5)[0]  # protocol 5 (a view: charged as a tensor)
    numpy_scalar = np.float32(0).__reduce__()[0]  # numpy scalars
    codecs_encode = importlib.import_module("_codecs").encode

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
        try:
            empty = math.prod(args[0]) * np.dtype(args[1]).itemsize
        except Exception:  # malformed: numpy's own error comes at BUILD
            empty = 0
        budget.charge(int(empty), "allocating an array")
        return _PendingArray(lambda: reconstruct(subtype, *args), budget)

    def scalar(dtype: Any, *args: object) -> Any:
        budget.charge(int(getattr(dtype, "itemsize", 0)), "rebuilding a numpy scalar")
        return numpy_scalar(dtype, *args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): encode,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct_pending
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
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
