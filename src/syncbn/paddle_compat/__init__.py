"""Paddle flavour of syncbn: Paddle's signatures and conventions on top of PyTorch.

The layers ``SyncBatchNorm`` (synchronized over a ``torch.distributed`` group),
``BatchNorm1D``/``BatchNorm2D``/``BatchNorm3D`` and the old-style ``BatchNorm``,
with Paddle's arguments, parameter names (``weight``, ``bias``, ``_mean``,
``_variance``) and numerics (float32 ``momentum``/``epsilon``, biased running
variance); and their building blocks: ``ParamAttr``, initializers and
regularizers, the ``*_attr`` resolver, optimizer helpers that honour the attrs,
the ``act=`` activations, and a safe ``.pdparams`` reader.
"""

from ._activations import ACTIVATION_NAMES as ACTIVATION_NAMES
from ._activations import INVERTIBLE_ACTIVATIONS as INVERTIBLE_ACTIVATIONS
from ._activations import get_activation as get_activation
from ._activations import is_invertible as is_invertible
from ._checkpoint import STRUCTURE_KEY as STRUCTURE_KEY
from ._checkpoint import UnsafePickleError as UnsafePickleError
from ._checkpoint import load_pdparams as load_pdparams
from ._checkpoint import paddle_to_torch_state_dict as paddle_to_torch_state_dict
from ._initializers import Constant as Constant
from ._initializers import Initializer as Initializer
from ._initializers import KaimingNormal as KaimingNormal
from ._initializers import KaimingUniform as KaimingUniform
from ._initializers import Normal as Normal
from ._initializers import TruncatedNormal as TruncatedNormal
from ._initializers import Uniform as Uniform
from ._initializers import XavierNormal as XavierNormal
from ._initializers import XavierUniform as XavierUniform
from ._initializers import calculate_gain as calculate_gain
from ._layers import BatchNorm as BatchNorm
from ._layers import BatchNorm1D as BatchNorm1D
from ._layers import BatchNorm2D as BatchNorm2D
from ._layers import BatchNorm3D as BatchNorm3D
from ._layers import SyncBatchNorm as SyncBatchNorm
from ._optim import clippable_parameters as clippable_parameters
from ._optim import l1_penalty as l1_penalty
from ._optim import optimizer_param_groups as optimizer_param_groups
from ._param_attr import L1Decay as L1Decay
from ._param_attr import L2Decay as L2Decay
from ._param_attr import ParamAttr as ParamAttr
from ._param_attr import ParamSpec as ParamSpec
from ._param_attr import WeightDecayRegularizer as WeightDecayRegularizer
from ._param_attr import attach_param_attr as attach_param_attr
from ._param_attr import copy_param_attrs as copy_param_attrs
from ._param_attr import create_parameter as create_parameter
from ._param_attr import get_param_attr as get_param_attr
from ._param_attr import named_param_attrs as named_param_attrs
from ._param_attr import resolve_param_attr as resolve_param_attr

__all__ = [
    "ACTIVATION_NAMES",
    "INVERTIBLE_ACTIVATIONS",
    "STRUCTURE_KEY",
    "BatchNorm",
    "BatchNorm1D",
    "BatchNorm2D",
    "BatchNorm3D",
    "Constant",
    "Initializer",
    "KaimingNormal",
    "KaimingUniform",
    "L1Decay",
    "L2Decay",
    "Normal",
    "ParamAttr",
    "ParamSpec",
    "SyncBatchNorm",
    "TruncatedNormal",
    "Uniform",
    "UnsafePickleError",
    "WeightDecayRegularizer",
    "XavierNormal",
    "XavierUniform",
    "attach_param_attr",
    "calculate_gain",
    "clippable_parameters",
    "copy_param_attrs",
    "create_parameter",
    "get_activation",
    "get_param_attr",
    "is_invertible",
    "l1_penalty",
    "load_pdparams",
    "named_param_attrs",
    "optimizer_param_groups",
    "paddle_to_torch_state_dict",
    "resolve_param_attr",
]
