"""Glue for other ecosystems, one module per ecosystem; each imports its package only when used.

Nothing here is imported by ``import syncbn``: :func:`syncbn.convert_sync_batchnorm`
imports a library's module the first time it meets a BatchNorm class of that
library (see :mod:`syncbn.convert`), and the module registers its rules with
:func:`syncbn.register_conversion` (keeping any rule the user registered first).

- :mod:`syncbn.integrations.timm`: timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``.
- :mod:`syncbn.integrations.lightning`: a Lightning ``LayerSync`` plugin (imported by the user).
"""
