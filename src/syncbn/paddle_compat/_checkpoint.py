"""Read ``.pdparams`` files without Paddle, and map a Paddle state dict onto a torch model.

``paddle.save(layer.state_dict(), path)`` writes a pickle (protocol 2–4) of a dict:
parameter name → numpy array, plus the bookkeeping entry
``"StructuredToParameterName@@"`` (structured name → Paddle's internal name).
:func:`load_pdparams` unpickles it with an allow-list, so a file cannot run code:
the only globals it may name are the ones numpy arrays are rebuilt from (listed in
``_ALLOWED_GLOBALS``); anything else raises :class:`UnsafePickleError` naming it.

Recipe::

    state = load_pdparams("net.pdparams")                    # name -> torch.Tensor
    model.load_state_dict(paddle_to_torch_state_dict(state, model))

numpy is needed only here, and imported only when a file is read.
"""

from __future__ import annotations

import importlib
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
    "STRUCTURE_KEY",
    "UnsafePickleError",
    "load_pdparams",
    "paddle_to_torch_state_dict",
]

STRUCTURE_KEY = "StructuredToParameterName@@"
"""Paddle's bookkeeping entry in a saved state dict; not a tensor, skipped on load."""


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.pdparams`` file named a global outside the allow-list; nothing was executed."""


def _import_numpy() -> ModuleType:
    try:
        return importlib.import_module("numpy")
    except ImportError as exc:
        raise ImportError(
            "load_pdparams needs numpy to rebuild the arrays in a .pdparams file, and numpy "
            "is not installed. Fix: pip install numpy"
        ) from exc


def _allowed_globals(np: ModuleType) -> dict[tuple[str, str], Any]:
    """(module, name) → object, for every global a numpy-array pickle may name.

    The numpy helpers are taken from numpy's own ``__reduce__`` results rather than
    imported by path: their module moved from ``numpy.core`` (numpy 1) to
    ``numpy._core`` (numpy 2, where importing ``numpy.core`` warns), and files from
    either must load under either.
    """
    reconstruct = np.arange(1).__reduce__()[0]  # protocols 2-4
    frombuffer = np.arange(1).__reduce_ex__(5)[0]  # protocol 5
    scalar = np.float32(0).__reduce__()[0]  # numpy scalars
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): importlib.import_module("_codecs").encode,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
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


def _to_tensor(np: ModuleType, key: str, value: object, source: str) -> Tensor:
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
    native = value.astype(value.dtype.newbyteorder("="), order="C", copy=True)
    return torch.from_numpy(native)


def load_pdparams(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a file written by ``paddle.save(state_dict, path)`` into ``name -> torch.Tensor``.

    Safe on untrusted files: see the module docstring. The tensors keep the arrays'
    dtypes and shapes (a Paddle ``Linear`` weight is ``(in, out)``; see
    :func:`paddle_to_torch_state_dict`). Paddle saves bfloat16 tensors as ``uint16``
    arrays; reinterpret those with ``tensor.view(torch.bfloat16)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImportError: numpy is not installed.
        UnsafePickleError: the pickle names a global outside the allow-list.
        pickle.UnpicklingError: the file is not a readable pickle.
        ValueError: the pickle is not a dict of arrays.
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
    with file.open("rb") as stream:
        try:
            loaded = _RestrictedUnpickler(stream, _allowed_globals(np), source).load()
        except UnsafePickleError:
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
    return {
        str(key): _to_tensor(np, str(key), value, source)
        for key, value in loaded.items()
        if key != STRUCTURE_KEY
    }


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
