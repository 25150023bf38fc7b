"""Sample ids: img2dataset's key scheme, and data_size (max sample id + 1) from the file beside the shards.

img2dataset numbers row `row` of input shard `shard` as shard * 10^ceil(log10(samples per shard)) + row,
zero-padded to oom_shard_count + that many digits (img2dataset/downloader.py `compute_key`, and the
`oom_sample_per_shard` it computes before its download loop; oom_shard_count is 5 by default). Ids therefore
have gaps: between shards whenever the shard size is not a power of ten, and wherever a download failed.
Per-sample estimator state is indexed by id, so its size, data_size, is max id + 1, not the sample count.

`neuclip data download` and `neuclip data synth` both write `dataset.yaml` beside the shards (INFO), holding
num_samples and data_size; the trainer's default data_size is read from it (`data_size_of`), else from the
shards' index (the ids of every sample, neuclip/data/index.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from neuclip.data.index import shard_index
from neuclip.data.shards import ShardError
from neuclip.yamlio import yaml_load

INFO = "dataset.yaml"  # the registry fields of a shard folder: shards, num_samples, data_size
OOM_SHARD_COUNT = 5  # img2dataset's default oom_shard_count: shard names and the shard part of keys


def oom_sample(per_shard: int) -> int:
    """Digits of the row part of a key: img2dataset's math.ceil(math.log10(number_sample_per_shard))."""
    return math.ceil(math.log10(per_shard))


def sample_id(shard: int, row: int, per_shard: int) -> int:
    """The id img2dataset gives row `row` of input shard `shard` (compute_key's true_key)."""
    return 10 ** oom_sample(per_shard) * shard + row


def img2dataset_key(shard: int, row: int, per_shard: int, oom_shard_count: int = OOM_SHARD_COUNT) -> str:
    """The key string img2dataset writes for that row (its downloader.compute_key)."""
    return f"{sample_id(shard, row, per_shard):0{oom_shard_count + oom_sample(per_shard)}d}"


def key_scheme(per_shard: int, oom_shard_count: int = OOM_SHARD_COUNT) -> str:
    """The scheme in words, as dataset.yaml records it."""
    digits = oom_sample(per_shard)
    return f"shard * 10^{digits} + row, {oom_shard_count + digits} digits"


def key_space(shard_rows: Iterable[tuple[int, int]], per_shard: int) -> int:
    """data_size of shards given as (shard number, input rows): one more than the largest id img2dataset can
    have given out (rows that failed to download included)."""
    return max((sample_id(shard, rows, per_shard) for shard, rows in shard_rows), default=0)


def contiguous_rows(num: int, per_shard: int) -> list[tuple[int, int]]:
    """(shard, rows) of `num` rows cut into shards of `per_shard`, as img2dataset cuts its input (and the
    synthetic generator its samples)."""
    return [(shard, min(per_shard, num - start)) for shard, start in enumerate(range(0, num, per_shard))]


def read_info(folder: str | Path) -> dict | None:
    """The folder's dataset.yaml (None: there is none)."""

    path = Path(folder) / INFO
    if not path.exists():
        return None
    info = yaml_load(path.read_text())
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a mapping with num_samples and data_size")
    return info


def declared_data_size(shards: Iterable[str | Path]) -> tuple[int, list[Path]] | None:
    """(data_size, the dataset.yaml files it came from) when every shard's folder has a dataset.yaml with a
    data_size: the largest of them (shards from several folders share one id space). None otherwise."""
    folders = sorted({Path(s).absolute().parent for s in shards})
    sizes = []
    for folder in folders:
        info = read_info(folder)
        if info is None or info.get("data_size") is None:
            return None
        value = info["data_size"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{folder / INFO}: data_size {value!r} is not a positive integer (max sample id + 1)")
        sizes.append(value)
    return (max(sizes), [f / INFO for f in folders]) if sizes else None


def indexed_data_size(shards: Iterable[str | Path]) -> int:
    """Max sample id + 1 over the shards' index (built and cached if need be; unreadable shards are left to
    the trainer's bad-data rules). 0 when no sample has an id."""
    top, count, where = -1, 0, None
    for shard in shards:
        try:
            index = shard_index(shard)
        except ShardError:
            continue
        ids = index.ids
        count += int((ids >= 0).sum())
        if len(ids) and int(ids.max()) > top:
            top, where = int(ids.max()), (shard, index.key(int(ids.argmax())))
    if top + 1 > max(1 << 20, 64 * count):
        raise ValueError(
            f"shard {where[0]} key {where[1]}: sample id {top} lies far beyond the ids of the {count} samples "
            f"(data_size = max id + 1 would size the per-sample state at {top + 1} entries); correct that key, or "
            "give the id space in dataset.yaml beside the shards or data.data_size / --data-size (ids at or above "
            "it are then bad samples)"
        )
    return top + 1


def data_size_source(shards: list[str], data_size: int) -> str:
    """How a message names the id space `data_size`: with the dataset.yaml it came from, when it came from one."""
    declared = declared_data_size(shards)
    if declared is not None and declared[0] == data_size:
        return f"data_size {data_size} (from {', '.join(map(str, declared[1]))})"
    return f"data_size {data_size}"


def data_size_of(shards: list[str]) -> tuple[int, str]:
    """(data_size, where it came from): dataset.yaml beside the shards, else the shards' index."""
    declared = declared_data_size(shards)
    if declared is not None:
        return declared[0], ", ".join(map(str, declared[1]))
    return indexed_data_size(shards), "the shards' index (max sample id + 1)"


def id_beyond(shards: list[str], data_size: int) -> str | None:
    """The error for the first sample (shard order, then tar order) whose id is >= data_size, naming its shard,
    key and id, and the file data_size came from when it is a dataset.yaml; None when every id fits."""
    for shard in shards:
        try:
            index = shard_index(shard)
        except ShardError:
            continue
        over = (index.ids >= data_size).nonzero()[0]
        if len(over):
            i = int(over[0])
            declared = declared_data_size(shards)
            source = f"data.data_size ({data_size})"
            if declared is not None and declared[0] == data_size:
                source = f"data.data_size ({data_size}, from {', '.join(map(str, declared[1]))})"
            return (
                f"shard {shard} key {index.key(i)}: sample id {int(index.ids[i])} >= {source}: set data.data_size to "
                "max id + 1 (the size of per-sample state), or correct data_size in that dataset.yaml"
            )
    return None
