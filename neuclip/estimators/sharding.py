"""Per-sample state sharded across ranks by sample id (docs/method.md §3, "State size and placement").

Layout: sample id i lives on rank i % world, at slot i // world of that rank's arrays. Interleaving by id
keeps the shards balanced whatever range the ids cover (img2dataset keys leave gaps where downloads failed,
and a global batch draws ids from everywhere), and a rank's slots are a plain strided view of the full array,
so the same state can be re-cut for another world size (`reshard`).

The estimator still computes everything for the whole global batch from all-gathered values; only *storage*
is split: the owner of each id reads and updates it, and the batch's values reach every rank through one
all-reduce of a B-vector in which every other rank contributes an exact zero (x + 0 = x in IEEE arithmetic, so
the result is bit-identical to reading a replicated array). Per rank: state for data_size / world ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

RESHARD_CHUNK = 1 << 22  # ids handled at a time when re-cutting a shard (bounds the temporaries)


@dataclass(frozen=True)
class IdShards:
    """This rank's share of `data_size` per-sample slots; world = 1 is the whole (replicated) array."""

    rank: int
    world: int
    data_size: int

    @property
    def size(self) -> int:
        return len(range(self.rank, self.data_size, self.world))

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids this rank stores."""
        if self.world == 1:
            return torch.ones_like(ids, dtype=torch.bool)
        return ids % self.world == self.rank

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Local positions of ids this rank owns."""
        return ids if self.world == 1 else ids // self.world


@torch.no_grad()
def read_batch(layout: IdShards, arrays: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """(len(arrays), len(ids)): the values of `ids` in each array. Collective when the state is sharded over
    several ranks: every rank must pass the same ids (e.g. the all-gathered global batch)."""
    if layout.world == 1:
        return torch.stack([a[ids] for a in arrays])
    own = layout.owned(ids)
    slots = layout.slots(ids[own])
    out = torch.zeros(len(arrays), ids.numel(), dtype=arrays[0].dtype, device=arrays[0].device)
    for k, a in enumerate(arrays):
        out[k, own] = a[slots]
    dist.all_reduce(out)  # one owner per id, exact zeros elsewhere: the owner's values, bit for bit
    return out


@torch.no_grad()
def share_updates(layout: IdShards, values: torch.Tensor) -> torch.Tensor:
    """`values` (k, B) filled by each rank at the ids it owns and zero elsewhere -> the whole rows everywhere."""
    if layout.world > 1:
        dist.all_reduce(values)
    return values


@torch.no_grad()
def reshard(target: IdShards, specs: dict[str, tuple[torch.dtype, float]],
            sources: list[tuple[IdShards, Callable[[], dict[str, torch.Tensor]]]]) -> dict[str, torch.Tensor]:
    """This rank's arrays under `target`, assembled from arrays cut another way. `specs`: key -> (dtype, fill);
    `sources`: one (layout, load) pair per old shard, `load()` giving that shard's {key: array}; they are
    loaded one at a time (memory: this rank's arrays plus one old shard, read memory-mapped by the caller)."""
    out = {key: torch.full((target.size,), fill, dtype=dtype) for key, (dtype, fill) in specs.items()}
    for layout, load in sources:
        old = load()
        for key in out:
            if old[key].shape[0] != layout.size:
                raise ValueError(f"state shard {key!r} of rank {layout.rank} of {layout.world} holds "
                                 f"{old[key].shape[0]} entries, expected {layout.size} for data_size "
                                 f"{layout.data_size}")
        for k0 in range(0, layout.size, RESHARD_CHUNK):
            k = torch.arange(k0, min(k0 + RESHARD_CHUNK, layout.size))
            ids = layout.rank + layout.world * k
            mine = target.owned(ids)
            slots = target.slots(ids[mine])
            for key, array in out.items():
                array[slots] = old[key][k0 : k0 + k.numel()][mine].to(array.dtype)
        del old
    return out
