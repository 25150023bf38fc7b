"""TEMPORARY: the earlier slot-based loader, kept only until the trainer moves to neuclip/train/data.py.

Deterministic, resumable training data from img2dataset webdataset shards.

Why not webdataset's pipeline (or open_clip's): their shuffle is unseeded, and resuming mid-epoch means
decoding everything consumed so far. Here the sample order is a pure function of (seed, shards, number of
reader slots), and a position is a few integers, so a restart replays only tar headers up to it.

- The data is read by S = world_size * max(1, workers) *slots*; slot k = rank * workers + worker.
- Pass p (a walk over all shards) shuffles the shard list with a seed derived from (seed, p). Slot k takes
  shards[k::S] (or, with fewer shards than slots, every S-th sample of all shards), scans their tar headers
  into records (member offsets, no bytes), and runs them through a seeded shuffle buffer of records.
  Passes follow each other forever; the trainer's epochs (`train_num_samples`) are windows on this stream.
- A slot emits chunks of global_batch / S samples. The global batch t is [chunk t of slot 0, ..., chunk t of
  slot S-1], whichever way S splits into ranks x workers: one process with 2 workers and two processes with
  1 worker see the same global batches.
- Position of slot k = {pass, drawn, bad_samples, bad_shards}: the replay re-scans pass `pass` up to record
  `drawn` without reading any image. Images are decoded and augmented with a per-sample seed, so
  augmentation does not depend on which process decodes them either.
- Sample id = int(json["key"]). A corrupt shard or sample raises DataError naming shard and key, or with
  skip_bad is skipped, counted (in the position, so counts survive restarts) and reported on stderr; counts
  and reports come from pass 0 only, so they are of distinct bad shards/samples met, not of re-encounters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SPLIT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / extension split


from neuclip.data.check import DataError  # noqa: E402 - the one DataError


class _BadSample(Exception):
    pass


def fresh_position() -> dict:
    return {"pass": 0, "drawn": 0, "bad_samples": 0, "bad_shards": 0}


def mix(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a brace pattern (also `a::b`, globs and folders); every one must exist."""
    from neuclip.data.shards import expand_pattern

    shards = [str(p) for p in expand_pattern(pattern)]
    if not shards:
        raise DataError(f"data.train_shards {pattern!r} names no shards")
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(shards)} shards of {pattern!r} do not exist, e.g. {missing[0]}"
        )
    return shards


def scan_shard(path: str) -> Iterator[tuple[str, dict]]:
    """(key, {ext: (offset, size)}) for each sample of a tar shard, from its headers only.

    Raises DataError for a shard that is not a tar, has a corrupt header or is truncated (tarfile alone
    stops silently at a cut, so the last member's data must lie inside the file).
    """
    key, members, last_key, end = None, {}, None, 0
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            tf = tarfile.open(fileobj=f, mode="r:")
            while True:
                info = tf.next()
                if info is None:
                    break
                tf.members.clear()  # tarfile keeps every header otherwise; we only stream
                if not info.isfile():
                    continue
                m = _SPLIT.match(info.name)
                if m is None:
                    continue
                k, ext = m.group(1), m.group(2).lower()
                end = info.offset_data + info.size
                if k != key:
                    if key is not None:
                        last_key = key
                        yield key, members
                    key, members = k, {}
                members[ext] = (info.offset_data, info.size)
            # tarfile stops silently at a corrupt or cut header: a real end has the zero end-of-archive block.
            f.seek(tf.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if block != b"\0" * tarfile.BLOCKSIZE:
                what = (
                    "no end-of-archive marker (truncated?)"
                    if len(block) < tarfile.BLOCKSIZE
                    else "unreadable tar header"
                )
                raise tarfile.ReadError(f"{what} at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError) as err:
        where = f" after key {key or last_key}" if (key or last_key) else " at its start"
        raise DataError(f"corrupt shard {path}{where}: {err}") from err
    if end > size:
        raise DataError(
            f"corrupt shard {path}: truncated in sample {key} ({size} bytes, member ends at {end})"
        )
    if key is not None:
        yield key, members


class SlotReader:
    """The infinite record/chunk stream of one slot (see the module docstring)."""

    def __init__(
        self,
        shards: list[str],
        *,
        seed: int,
        slot: int,
        num_slots: int,
        shuffle_buffer: int,
        skip_bad: bool,
        transform=None,
        tokenizer=None,
    ):
        self.shards, self.seed, self.slot, self.num_slots = list(shards), seed, slot, num_slots
        self.shuffle_buffer, self.skip_bad = shuffle_buffer, skip_bad
        self.transform, self.tokenizer = transform, tokenizer
        self.counts = {"bad_samples": 0, "bad_shards": 0}
        self._handles: OrderedDict[int, io.BufferedReader] = OrderedDict()

    # -- records ---------------------------------------------------------------------------------------
    def _bad(self, kind: str, message: str, p: int) -> None:
        """Raise, or skip: counted and reported in pass 0 only, so counts are of distinct shards/samples."""
        if not self.skip_bad:
            raise DataError(message + " (set data.skip_bad=true to skip and count such samples)")
        if p == 0:
            self.counts[kind] += 1
            print(f"neuclip data: skipped ({kind[4:]}): {message}", file=sys.stderr, flush=True)

    def _pass_records(self, p: int) -> Iterator[tuple]:
        order = list(range(len(self.shards)))
        random.Random(mix(self.seed, "shards", p)).shuffle(order)
        S, k = self.num_slots, self.slot
        by_shard = len(order) >= S
        mine = order[k::S] if by_shard else order
        index = 0  # sample index within the pass over `mine` (for the sample-level split)
        for si in mine:
            path = self.shards[si]
            samples = scan_shard(path)
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    break
                except DataError as err:
                    if not self.skip_bad or by_shard or si % S == k:  # count a shard once, not per slot
                        self._bad("bad_shards", str(err), p)
                    break
                ours = by_shard or index % S == k
                index += 1
                if not ours:
                    continue
                missing = [e for e in ("txt", "json") if e not in members]
                if not any(e in members for e in IMAGE_EXTS):
                    missing.insert(0, "jpg")
                if missing:
                    self._bad("bad_samples", f"shard {path} key {key}: missing .{', .'.join(missing)}", p)
                    continue
                yield (si, key, members)

    def _pass_shuffled(self, p: int) -> Iterator[tuple]:
        n = self.shuffle_buffer
        records = self._pass_records(p)
        if n <= 1:
            yield from records
            return
        rng = random.Random(mix(self.seed, "buffer", p, self.slot))
        buf: list = []
        for rec in records:
            if len(buf) < n:
                buf.append(rec)
                continue
            j = rng.randrange(n)
            out, buf[j] = buf[j], rec
            yield out
        rng.shuffle(buf)
        yield from buf

    def records(self, position: dict) -> Iterator[tuple]:
        """(record, pass, drawn) from `position` on, forever; counts resume at the position's values."""
        p, skip = int(position["pass"]), int(position["drawn"])
        saved = {"bad_samples": int(position["bad_samples"]), "bad_shards": int(position["bad_shards"])}
        if skip == 0:
            self.counts = dict(saved)
        while True:
            n = 0
            for rec in self._pass_shuffled(p):
                n += 1
                if n <= skip:
                    if n == skip:
                        # The replay is now exactly where the original run was: its counts are the truth.
                        self.counts = dict(saved)
                    continue
                yield rec, p, n
            if n < skip:
                raise DataError(
                    f"slot {self.slot}: pass {p} has {n} samples but the checkpoint consumed {skip}: "
                    "the shards changed since the checkpoint was written"
                )
            if n == 0:
                raise DataError(
                    f"slot {self.slot} of {self.num_slots} found no usable sample in pass {p} "
                    f"({len(self.shards)} shards)"
                )
            p, skip = p + 1, 0

    # -- decoding --------------------------------------------------------------------------------------
    def _read(self, si: int, offset: int, size: int) -> bytes:
        f = self._handles.get(si)
        if f is None:
            f = open(self.shards[si], "rb")  # noqa: SIM115 - cached, closed on eviction
            self._handles[si] = f
            if len(self._handles) > 8:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(si)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise _BadSample(f"member truncated ({len(data)} of {size} bytes)")
        return data

    def decode(self, rec: tuple, sample_seed: int) -> tuple[torch.Tensor, str, int]:
        from PIL import Image

        si, key, members = rec
        try:
            meta = json.loads(self._read(si, *members["json"]))
            sample_id = int(meta["key"])
            if sample_id < 0:
                raise ValueError(f"negative key {sample_id}")
        except _BadSample:
            raise
        except Exception as err:
            raise _BadSample(f"bad .json (need an integer 'key'): {err!r}") from err
        try:
            text = self._read(si, *members["txt"]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _BadSample(f"bad .txt: {err}") from err
        ext = next(e for e in IMAGE_EXTS if e in members)
        try:
            image = Image.open(io.BytesIO(self._read(si, *members[ext])))
            image = image.convert("RGB")
        except _BadSample:
            raise
        except Exception as err:
            raise _BadSample(f"cannot decode .{ext}: {err}") from err
        if self.transform is not None:
            torch.default_generator.manual_seed(sample_seed)
            image = self.transform(image)
        return image, text, sample_id

    def chunks(self, position: dict, chunk_size: int) -> Iterator[dict]:
        """Decoded chunks {"slot", "image", "text", "ids", "position"}; "position" is the state after it."""
        records = self.records(position)
        while True:
            images, texts, ids = [], [], []
            rng_state = torch.default_generator.get_state()  # per-sample seeds must not disturb the caller
            try:
                while len(ids) < chunk_size:
                    rec, p, n = next(records)
                    try:
                        image, text, sample_id = self.decode(rec, mix(self.seed, "sample", p, self.slot, n))
                    except _BadSample as err:
                        self._bad("bad_samples", f"shard {self.shards[rec[0]]} key {rec[1]}: {err}", p)
                        continue
                    images.append(image)
                    texts.append(text)
                    ids.append(sample_id)
            finally:
                torch.default_generator.set_state(rng_state)
            yield {
                "slot": self.slot,
                "image": torch.stack(images) if isinstance(images[0], torch.Tensor) else images,
                "text": self.tokenizer(texts) if self.tokenizer is not None else texts,
                "ids": torch.tensor(ids, dtype=torch.int64),
                "position": {"pass": p, "drawn": n, **self.counts},
            }

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class TrainStream(IterableDataset):
    """This rank's slots as an IterableDataset: worker j (or the main process) streams slot rank*w + j."""

    def __init__(
        self,
        shards: list[str],
        *,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        chunk_size: int,
        positions: list[dict],
        shuffle_buffer: int,
        skip_bad: bool,
        transform=None,
        tokenizer=None,
    ):
        super().__init__()
        self.shards, self.seed, self.workers, self.chunk_size = shards, seed, workers, chunk_size
        self.per_rank = max(1, workers)
        self.num_slots = world_size * self.per_rank
        self.slots = [rank * self.per_rank + j for j in range(self.per_rank)]
        if len(positions) != self.num_slots:
            raise ValueError(f"need {self.num_slots} slot positions, got {len(positions)}")
        self.positions = positions
        self.shuffle_buffer, self.skip_bad = shuffle_buffer, skip_bad
        self.transform, self.tokenizer = transform, tokenizer

    def reader(self, slot: int) -> SlotReader:
        return SlotReader(
            self.shards,
            seed=self.seed,
            slot=slot,
            num_slots=self.num_slots,
            shuffle_buffer=self.shuffle_buffer,
            skip_bad=self.skip_bad,
            transform=self.transform,
            tokenizer=self.tokenizer,
        )

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        slot = self.slots[0 if info is None else info.id]
        reader = self.reader(slot)
        try:
            yield from reader.chunks(self.positions[slot], self.chunk_size)
        finally:
            reader.close()


class Loader:
    """Local batches (images, tokens, ids) and the data position they leave behind.

    `positions` holds this rank's slots' positions after the last batch handed out; `merged_positions`
    gathers every rank's (for a checkpoint written by rank 0).
    """

    def __init__(self, stream: TrainStream, *, pin_memory: bool = False):
        self.stream = stream
        self.positions = {s: dict(stream.positions[s]) for s in stream.slots}
        kwargs = {}
        if stream.workers > 0:
            kwargs = {"prefetch_factor": 2, "persistent_workers": False}
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=stream.workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chunks = [next(self._it) for _ in self.stream.slots]
        got = [int(c["slot"]) for c in chunks]
        if got != self.stream.slots:
            raise RuntimeError(f"data loader returned slots {got}, expected {self.stream.slots}")
        for c in chunks:
            self.positions[int(c["slot"])] = {k: int(v) for k, v in c["position"].items()}
        if len(chunks) == 1:
            c = chunks[0]
            return c["image"], c["text"], c["ids"]
        return (
            torch.cat([c["image"] for c in chunks]),
            torch.cat([c["text"] for c in chunks]),
            torch.cat([c["ids"] for c in chunks]),
        )

    def bad_counts(self) -> dict:
        return {k: sum(p[k] for p in self.positions.values()) for k in ("bad_samples", "bad_shards")}

    def close(self) -> None:
        it, self._it = self._it, None
        del it


def merged_positions(local: dict[int, dict], num_slots: int) -> list[dict]:
    """Every slot's position (an all_gather across ranks when distributed)."""
    import torch.distributed as dist

    merged = dict(local)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        for part in gathered:
            merged.update(part)
    missing = [s for s in range(num_slots) if s not in merged]
    if missing:
        raise RuntimeError(f"no data position for slots {missing}")
    return [merged[s] for s in range(num_slots)]
