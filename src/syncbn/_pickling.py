"""Copying and pickling a layer that holds a process group (both flavours' ``SyncBatchNorm``).

A ``torch.distributed`` process group belongs to the process that created it: it
cannot be pickled, and a copy of it would be no group at all. So a layer with a
custom ``process_group`` travels like this:

=================================  ==========================================================
``copy.deepcopy(layer)``           same process (an EMA model, an eval copy): the copy
                                   **shares** the group and copies everything else
``pickle`` / ``torch.save(model)``  the group is dropped (``process_group = None``) and the
                                   copy records that (``_syncbn_group_lost``); its next
                                   synchronized forward raises :func:`check_group_travelled`'s
                                   error instead of silently using the default group
``state_dict``                     unaffected: a group was never part of the state
=================================  ==========================================================

Setting ``layer.process_group`` again (or converting the model again with a group)
clears the condition. :class:`GroupPicklingMixin` gives a module these rules; put it
first among the bases.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

from . import _comm

__all__ = ["GROUP_LOST_ATTRIBUTE", "GroupPicklingMixin", "check_group_travelled"]

GROUP_LOST_ATTRIBUTE = "_syncbn_group_lost"
"""Set to True on a layer that was unpickled without the custom group it had."""

_Module = TypeVar("_Module", bound="GroupPicklingMixin")


class GroupPicklingMixin(nn.Module):
    """``__getstate__`` drops a custom ``process_group`` (and records it); ``__deepcopy__``
    shares it. The module keeps its group in ``self.process_group``."""

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without its custom process group, which cannot leave its process."""
        # nn.Module's __getstate__ is untyped in torch
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        if state.get("process_group") is not None:
            state["process_group"] = None
            state[GROUP_LOST_ATTRIBUTE] = True
        return state

    def __deepcopy__(self: _Module, memo: dict[int, Any]) -> _Module:
        """A deep copy in the same process: shares the process group, copies the rest."""
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        # nn.Module's __setstate__ is untyped in torch
        copied.__setstate__(copy.deepcopy(dict(self.__dict__), memo))  # type: ignore[no-untyped-call]
        return copied


def check_group_travelled(module: nn.Module, layer_name: str, reconvert: str) -> None:
    """Raise if ``module`` was unpickled without its custom group and none was set since.

    Args:
        module: the layer (its ``process_group`` and :data:`GROUP_LOST_ATTRIBUTE`).
        layer_name: how errors name the layer (``_comm.layer_label`` is applied).
        reconvert: the call that sets a group on every layer of a model, for the fix.

    Raises:
        ValueError: the group was dropped by pickling and ``process_group`` is still None.
    """
    if module.__dict__.get("process_group") is None and module.__dict__.get(
        GROUP_LOST_ATTRIBUTE, False
    ):
        raise ValueError(
            f"{_comm.layer_label(layer_name)} was unpickled, and its process group could "
            "not travel with it (process groups belong to one process); set "
            "layer.process_group (torch.distributed.group.WORLD for the default group), "
            f"or call {reconvert} again"
        )
