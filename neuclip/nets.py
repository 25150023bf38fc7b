"""Small networks that predict log-normalisers from a (detached) embedding.

`PrototypeNPN` is NeuCLIP's Normaliser-Prediction Network (docs/method.md §4 step 3); `ResidualMLP` is AmorLIP's
lambda-network (docs/method.md §5), also used as NeuCLIP's `npn: mlp` ablation. Both run in float32 or wider.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeNPN(nn.Module):
    """alpha_k(i) = log(eps + 1/m sum_p exp((cos(e_k_i, W_k_p) - s_ii) / tau)), k = 1 (images), 2 (texts).

    W1 (m x d) are stand-ins for the texts an image is contrasted with, W2 stand-ins for the images. The form
    mirrors the optimum alpha* = log(eps + g) with the unknown data set replaced by m learned prototypes.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(num_prototypes, dim) / math.sqrt(dim))

    @staticmethod
    def _alpha(anchor, prototypes, pos, scale, eps: float) -> torch.Tensor:
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        cos = anchor.to(dtype) @ F.normalize(prototypes.to(dtype), dim=1).T
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
