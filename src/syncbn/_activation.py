"""Activations fused after the normalization, and their inverses for the in-place mode.

With ``inplace=True`` the layer overwrites its input with ``y = f(z)``,
``z = w·x̂ + β``, and saves only ``y`` (In-Place Activated BatchNorm, Rota Bulò
et al., arXiv:1712.02616). Backward needs, from ``y`` alone:

- ``dz = dy·f'(z)``, written through ``y``:  identity ``1``; leaky_relu ``1`` where
  ``y > 0`` else ``slope``;
- ``z = f⁻¹(y)``:  identity ``y``; leaky_relu ``y`` or ``y/slope``;
- ``x̂ = (z − β)/w``, which needs ``w ≠ 0`` (checked at forward).

So only activations that are invertible *in floating point* qualify: ``relu``
(slope 0) is refused in place, and so is ``elu``: it is invertible on paper
(``z = log1p(y/α)``), but in floating point it saturates at ``y = −α`` (for
``z ≲ −17`` in float32, much sooner in 16-bit), where ``z`` is lost and the
gradient ``dx = a·dz + b·z + c`` would be wrong (NaN from ``log1p(−1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu")
"""Names accepted by the Torch flavour's ``activation=``."""
DEFAULT_PARAM = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0}
"""``activation_param`` defaults: leaky_relu's negative slope, elu's α (torch's defaults)."""


@dataclass(frozen=True)
class Activation:
    """One of :data:`ACTIVATIONS` with its parameter (slope for leaky_relu, α for elu)."""

    name: str = "identity"
    param: float = 0.0

    @staticmethod
    def make(name: str, param: float | None) -> Activation:
        """Validated construction; ``param=None`` takes the name's default.

        Raises:
            ValueError: unknown name, or a parameter that is not finite.
        """
        if name not in ACTIVATIONS:
            raise ValueError(
                f"SyncBatchNorm expected activation to be one of {', '.join(ACTIVATIONS)}, "
                f"got {name!r}; apply other activations after the layer"
            )
        value = DEFAULT_PARAM[name] if param is None else float(param)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"activation_param must be finite, got {param!r}")
        return Activation(name, value)

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def invertible(self) -> bool:
        """Whether ``z`` can be recovered from ``f(z)`` (needed by ``inplace=True``)."""
        if self.name == "identity":
            return True
        if self.name == "leaky_relu":
            return self.param > 0
        return False  # relu; elu saturates in floating point (see the module docstring)

    def apply(self, z: Tensor) -> Tensor:
        """``f(z)`` out of place, differentiable by autograd."""
        if self.name == "relu":
            return F.relu(z)
        if self.name == "leaky_relu":
            return F.leaky_relu(z, self.param)
        if self.name == "elu":
            return F.elu(z, self.param)
        return z

    def apply_(self, z: Tensor) -> Tensor:
        """``f(z)`` written into ``z``."""
        if self.name == "relu":
            return z.relu_()
        if self.name == "leaky_relu":
            return F.leaky_relu_(z, self.param)
        if self.name == "elu":
            return F.elu_(z, self.param)
        return z

    def inverse(self, y: Tensor) -> Tensor:
        """``z = f⁻¹(y)`` (a new tensor); only for :attr:`invertible` activations."""
        if self.name == "leaky_relu":
            return torch.where(y >= 0, y, y / self.param)
        return y.clone()

    def grad_through(self, dy: Tensor, y: Tensor) -> Tensor:
        """``dz = dy·f'(z)`` expressed with the output ``y`` (a new tensor)."""
        if self.name == "leaky_relu":
            return torch.where(y > 0, dy, dy * self.param)  # as torch: slope at z = 0
        return dy.clone()
