"""Synthetic clustered image/text features, each sample a pure function of (seed, sample id).

    label_i = hash(i) mod clusters,  z0, z1, z2 ~ N(0, I) from hash(i, component)
    shared_i = centre[label_i] + noise z0,   image_i = shared_i + noise z1,   text_i = shared_i @ mix + noise z2

Nothing of size n is ever held: a training batch generates its own rows, and the measurement pass generates
the data set chunk by chunk, so memory stays flat up to n = 10^7 and beyond. A sample's features do not depend
on n either (the data set of n rows is the first n rows of any larger one). The normals come from a
counter-based generator (SplitMix64's finaliser on seed key + counter, two 32-bit uniforms per hash, then
Box-Muller), so any row can be produced alone and gives the same numbers: labels and image features bit for
bit, text features up to the float32 rounding of the `mix` matmul (BLAS may round differently for a different
number of rows generated together; the same calls always give the same bits).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_CHUNK = 1 << 15  # hashes per in-cache piece: numpy's temporaries stay in L2 (about 6x faster than one pass)


def stream_seed(seed: int, *names) -> int:
    """A 63-bit seed for one named random stream of a run, e.g. stream_seed(0, "order"), (0, "measure", 500).
    Streams are independent of one another: drawing from one never moves another."""
    digest = hashlib.sha256("/".join(map(str, (seed, *names))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _splitmix_(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, in place on uint64 (numpy wraps unsigned arithmetic modulo 2^64)."""
    np.right_shift(x, _S30, out=tmp)
    x ^= tmp
    x *= _M1
    np.right_shift(x, _S27, out=tmp)
    x ^= tmp
    x *= _M2
    np.right_shift(x, _S31, out=tmp)
    x ^= tmp
    return x


def hash_bits(key: int, counters: np.ndarray) -> np.ndarray:
    """uint64 hash of (key, counter) for every counter (uint64 array, any shape)."""
    flat = counters.reshape(-1)
    out = np.empty_like(flat)
    tmp = np.empty(min(_CHUNK, flat.size), dtype=np.uint64)
    offset = np.uint64(key) + _GOLDEN
    for s in range(0, flat.size, _CHUNK):
        piece = out[s : s + _CHUNK]
        np.add(flat[s : s + _CHUNK], offset, out=piece)
        _splitmix_(piece, tmp[: piece.size])
    return out.reshape(counters.shape)


def normals(key: int, rows: np.ndarray, width: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), width) float32 normals times `scale`, and one more uint64 hash per row (the row's label
    bits); row r's values depend only on (key, r). Layout: the cosine half of each Box-Muller pair, then the
    sine half (little-endian uint32 halves of each 64-bit hash give the two uniforms)."""
    pairs = (width + 1) // 2
    per_row = pairs + 1
    counters = rows.astype(np.uint64)[:, None] * np.uint64(per_row) + np.arange(per_row, dtype=np.uint64)
    bits = hash_bits(key, counters)
    halves = bits[:, :pairs].view(np.uint32).reshape(len(rows), pairs, 2)
    # u1 in (0, 1] so the log is finite; u2 in [0, 1); float32 keeps 24 of the 32 bits, plenty for features
    radius = torch.from_numpy(halves[..., 0].astype(np.float32)).add_(0.5).mul_(2.0**-32).log_()
    radius = radius.mul_(-2.0).sqrt_().mul_(scale)
    angle = torch.from_numpy(halves[..., 1].astype(np.float32)).mul_(2.0 * math.pi * 2.0**-32)
    out = torch.empty(len(rows), 2 * pairs)
    torch.mul(radius, angle.cos(), out=out[:, :pairs])
    torch.mul(radius, angle.sin_(), out=out[:, pairs:])
    return out[:, :width], bits[:, pairs]


class ClusteredPairs:
    """The data set: `features(ids)` gives (image_x, text_x), each (len(ids), dim_in) float32."""

    PIECE = 2048  # rows generated at a time: the intermediates stay in cache (measured ~2x faster than 64k)

    def __init__(self, seed: int, dim_in: int, clusters: int, noise: float):
        self.dim_in, self.clusters, self.noise = dim_in, clusters, noise
        gen = torch.Generator().manual_seed(stream_seed(seed, "centres"))
        self.centres = torch.randn(clusters, dim_in, generator=gen)
        self.mix = torch.randn(dim_in, dim_in, generator=gen) / math.sqrt(dim_in)
        self.key = stream_seed(seed, "samples")

    def labels(self, ids: torch.Tensor) -> torch.Tensor:
        """The cluster of each sample: the same hash `features` draws it from (the row's last counter)."""
        pairs = (3 * self.dim_in + 1) // 2
        counters = ids.reshape(-1).cpu().numpy().astype(np.uint64) * np.uint64(pairs + 1) + np.uint64(pairs)
        return self._cluster(hash_bits(self.key, counters))

    def _cluster(self, bits: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((bits % np.uint64(self.clusters)).astype(np.int64))

    def features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.reshape(-1).cpu().numpy()
        d = self.dim_in
        image, text = torch.empty(len(ids), d), torch.empty(len(ids), d)
        for s in range(0, len(ids), self.PIECE):
            z, bits = normals(self.key, ids[s : s + self.PIECE], 3 * d, self.noise)
            shared = self.centres[self._cluster(bits)].add_(z[:, :d])
            torch.add(shared, z[:, d : 2 * d], out=image[s : s + self.PIECE])
            torch.addmm(z[:, 2 * d :], shared, self.mix, out=text[s : s + self.PIECE])
        return image, text
