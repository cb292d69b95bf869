"""FFN kinds: which activation an FFN layer uses and whether it is gated.

Non-gated:  a_i = act(up_i . x + up_bias_i)
Gated:      a_i = act(gate_i . x + gate_bias_i) * (up_i . x + up_bias_i)
Output:     y   = sum over active neurons i of a_i * down_i
"""

from __future__ import annotations

from dataclasses import dataclass

from sparseflash.kernels.errors import KernelInputError

# Integer codes are what the compiled kernels branch on; the order is part of the kernel ABI.
ACTIVATIONS = ("relu2", "relu", "silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class FFNKind:
    """Activation plus gating of one FFN layer.

    activation: one of ACTIVATIONS. relu2 is relu(z)**2, gelu is the exact erf form
    (torch.nn.functional.gelu default), gelu_tanh the tanh approximation.
    gated: True when the layer has a gate projection (bundle_len = 3d), else 2d.
    """

    activation: str
    gated: bool

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise KernelInputError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def activation_code(self) -> int:
        """Index of the activation in ACTIVATIONS, as passed to compiled kernels."""
        return ACTIVATIONS.index(self.activation)

    @property
    def parts(self) -> int:
        """Number of d-long parts in one bundle: 3 if gated (gate, up, down) else 2 (up, down)."""
        return 3 if self.gated else 2

    @property
    def name(self) -> str:
        """Canonical name, the inverse of ffn_kind()."""
        for name, kind in KINDS.items():
            if kind == self:
                return name
        return f"{self.activation}{'_gated' if self.gated else ''}"


KINDS: dict[str, FFNKind] = {
    "relu2": FFNKind("relu2", gated=False),
    "relu": FFNKind("relu", gated=False),
    "silu": FFNKind("silu", gated=False),
    "gelu": FFNKind("gelu", gated=False),
    "gelu_tanh": FFNKind("gelu_tanh", gated=False),
    "reglu": FFNKind("relu", gated=True),
    "relu2glu": FFNKind("relu2", gated=True),
    "swiglu": FFNKind("silu", gated=True),
    "geglu": FFNKind("gelu", gated=True),
    "geglu_tanh": FFNKind("gelu_tanh", gated=True),
}


def ffn_kind(kind: str | FFNKind) -> FFNKind:
    """Resolve a kind name ("relu2", "reglu", "swiglu", ...) or pass an FFNKind through."""
    if isinstance(kind, FFNKind):
        return kind
    if isinstance(kind, str) and kind in KINDS:
        return KINDS[kind]
    raise KernelInputError(f"unknown FFN kind {kind!r}; expected one of {sorted(KINDS)} or an FFNKind")
