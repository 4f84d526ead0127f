"""syncbn: synchronized batch normalization for PyTorch, on any torch.distributed backend.

Torch flavour here; Paddle flavour in :mod:`syncbn.paddle_compat`.
"""

from . import functional as functional
from ._comm import SyncBatchNormError as SyncBatchNormError
from ._join import join as join
from .convert import convert_sync_batchnorm as convert_sync_batchnorm
from .convert import register_conversion as register_conversion
from .convert import revert_sync_batchnorm as revert_sync_batchnorm
from .modules import SyncBatchNorm as SyncBatchNorm

__version__ = "0.3.0"

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormError",
    "__version__",
    "convert_sync_batchnorm",
    "functional",
    "join",
    "register_conversion",
    "revert_sync_batchnorm",
]
