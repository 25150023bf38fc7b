"""Small networks that predict log-normalisers from a (detached) embedding.

`PrototypeNPN` is NeuCLIP's Normaliser-Prediction Network (docs/method.md §4 step 3); `ResidualMLP` is AmorLIP's
lambda-network (docs/method.md §5), also used as NeuCLIP's `npn: mlp` ablation. Both keep float32 (or wider)
parameters and outputs; the NPN's one large matmul (anchors x prototypes) may run on tensor cores instead
(`matmul`: "tf32" or "bf16" inputs, float32 accumulation and result: `low_precision_mm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MATMULS = ("fp32", "tf32", "bf16")


def round_inputs(x: torch.Tensor, mode: str) -> torch.Tensor:
    """`x` (float32) rounded to what a tensor core reads in `mode`: bf16 (8-bit significand) or tf32 (11-bit,
    round to nearest even on the float32 bits). Products of two such numbers are exact in float32, so a float32
    matmul of rounded inputs is the tensor-core result up to the order of the float32 sums."""
    if mode == "bf16":
        return x.bfloat16().float()
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def _mm(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a @ b with `mode` inputs and a float32 result: tensor cores on CUDA, an exact emulation elsewhere."""
    if a.device.type == "cuda" and mode == "bf16":
        return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
    if a.device.type == "cuda" and mode == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return a.float() @ b.float()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    return round_inputs(a, mode) @ round_inputs(b, mode)


class _LowPrecisionMM(torch.autograd.Function):
    """a @ b.T with every matmul of forward and backward in `mode` (as cuBLAS runs them with TF32 on)."""

    @staticmethod
    def forward(ctx, a, b, mode):
        ctx.save_for_backward(a, b)
        ctx.mode = mode
        return _mm(a, b.T, mode)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = _mm(grad, b, ctx.mode) if ctx.needs_input_grad[0] else None
        gb = _mm(grad.T, a, ctx.mode) if ctx.needs_input_grad[1] else None
        return ga, gb, None


def low_precision_mm(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a @ b.T (float32 result) with `mode` in {"fp32", "tf32", "bf16"} matmul inputs."""
    if mode == "fp32" or a.dtype == torch.float64:
        return a @ b.T
    return _LowPrecisionMM.apply(a.float(), b.float(), mode)


class PrototypeNPN(nn.Module):
    """alpha_k(i) = log(eps + 1/m sum_p exp((cos(e_k_i, W_k_p) - s_ii) / tau)), k = 1 (images), 2 (texts).

    W1 (m x d) are stand-ins for the texts an image is contrasted with, W2 stand-ins for the images. The form
    mirrors the optimum alpha* = log(eps + g) with the unknown data set replaced by m learned prototypes.
    `matmul` sets the precision of the anchors x prototypes matmul only (parameters and the rest stay float32).
    """

    def __init__(self, dim: int, num_prototypes: int, matmul: str = "fp32"):
        super().__init__()
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
        self.matmul = matmul
        self.w1 = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))

    def _alpha(self, anchor, prototypes, pos, scale, eps: float) -> torch.Tensor:
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        cos = low_precision_mm(anchor.to(dtype), F.normalize(prototypes.to(dtype), dim=1), self.matmul)
        log_mean = torch.logsumexp((cos - pos[:, None]) * scale, dim=1) - math.log(prototypes.shape[0])
        return torch.logaddexp(log_mean, torch.full_like(log_mean, math.log(eps)))

    def forward(self, image, text, pos, scale, eps: float):
        """(alpha1, alpha2) for anchors with normalised embeddings `image`, `text` and s_ii = `pos`."""
        return self._alpha(image, self.w1, pos, scale, eps), self._alpha(text, self.w2, pos, scale, eps)


class ResidualMLP(nn.Module):
    """AmorLIP's lambda-net: fc d->f d, ReLU, LN; fc ->d, ReLU, LN; residual add, ReLU; fc ->1."""

    def __init__(self, dim: int, factor: float = 1.0):
        super().__init__()
        hidden = max(1, int(round(factor * dim)))
        self.body = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, dim),
            nn.ReLU(),
            nn.LayerNorm(dim),
        )
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.head(F.relu(x + self.body(x))).squeeze(-1)


class MLPNPN(nn.Module):
    """NeuCLIP's `npn: mlp` ablation: one ResidualMLP per modality mapping the embedding straight to alpha."""

    def __init__(self, dim: int, factor: float = 1.0):
        super().__init__()
        self.net1, self.net2 = ResidualMLP(dim, factor), ResidualMLP(dim, factor)

    def forward(self, image, text, pos, scale, eps: float):
        return self.net1(image), self.net2(text)
