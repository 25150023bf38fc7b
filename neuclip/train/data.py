"""Training batches whose content is a function of (seed, shard list, global batch size, step) alone.

The order (MosaicML Streaming's "elastic determinism", without its downloader):
- The samples are the usable ones of the shards' cached index (neuclip/data/check.py `survey`: the one
  definition of a bad sample); N of them. An epoch is N // B global batches of size B; epoch e visits a
  bijection of the N samples, so each sample at most once per epoch and exactly once when B divides N (the
  N mod B left over, like drop_last, are different ones each epoch).
- The bijection is computed blockwise, so memory does not grow with N: the shard list is shuffled, its
  usable samples concatenated in that order, cut into blocks of `block` samples (data.shuffle_buffer), and
  each block shuffled. A position maps to a sample in O(log shards) with one block's permutation (8 bytes a
  sample) in memory. The trade-off: a batch mixes samples from the ~block / shard-size shards of one or two
  blocks, not from the whole data set (Streaming's shuffle_block_size makes the same one); a bigger block
  mixes more and reads from more files at once. Permutations are argsorts of splitmix64 hashes of the
  position, so they do not depend on the numpy or Python version.
- Global batch t is positions [kB, (k+1)B) of epoch e = t // steps_per_epoch, k = t % steps_per_epoch.
  Rank r of W takes its contiguous B/W of it. Loader workers decode whole local batches round-robin and the
  DataLoader hands them back in step order, so `data.workers` changes nothing but speed, and a different
  world size on resume still sees the same global batches.
- A sample's augmentation is seeded by (seed, epoch, position), not by who decodes it.
- The data position is the next step: a resume seeks in O(1), reading no tar headers (the index is cached)
  and no index either: the shards' survey is stored once per data-set version (neuclip/data/survey_cache.py).

Bad data: a bad shard or sample found by the survey stops the start with an error naming shard and key, or
with skip_bad is left out of the epoch and counted. An image that does not decode is only found when it is
decoded: an error naming shard and key, or with skip_bad counted (first epoch only, so a count is of distinct
samples) and replaced by a black image with the sample's own caption and id, so the batch keeps its size
and the ids stay unique.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from neuclip.data.check import BadImage, DataError, Problem, open_image
from neuclip.data.index import shard_index
from neuclip.data.keys import data_size_source
from neuclip.data.shards import IMAGE_EXTS, MemberReader, ShardError, expand_pattern
from neuclip.data.survey_cache import cached_survey

ORDER = "epoch-blocks-v1"  # the checkpoint's name for this order; a different one cannot be resumed
__all__ = ["DataError", "ORDER", "EpochOrder", "TrainLoader", "TrainData", "expand_shards", "mix", "random_order"]


def mix(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a brace pattern (also `a::b`, globs and folders); every one must exist."""
    shards = [str(p) for p in expand_pattern(pattern)]
    if not shards:
        raise DataError(f"data.train_shards {pattern!r} names no shards")
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shards of {pattern!r} do not exist, e.g. {missing[0]}")
    return shards


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def random_order(n: int, *seed_parts) -> np.ndarray:
    """A permutation of range(n): argsort of splitmix64(base + i * golden), base from `seed_parts`."""
    z = np.uint64(mix(*seed_parts)) + np.arange(n, dtype=np.uint64) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.argsort(z ^ (z >> np.uint64(31)), kind="stable")


class EpochOrder:
    """Which (shard, n-th usable sample of it) sits at each position of an epoch (see the module docstring)."""

    def __init__(self, counts: np.ndarray, seed: int, block: int):
        self.counts, self.seed, self.block = np.asarray(counts, dtype=np.int64), seed, max(1, int(block))
        self.total = int(self.counts.sum())
        self._shards: OrderedDict = OrderedDict()
        self._blocks: OrderedDict = OrderedDict()

    @staticmethod
    def _cached(cache: OrderedDict, key, make, keep: int):
        if key not in cache:
            cache[key] = make()
            while len(cache) > keep:
                cache.popitem(last=False)
        return cache[key]

    def _shard_order(self, epoch: int):
        def make():
            order = random_order(len(self.counts), self.seed, "shards", epoch)
            return order, np.cumsum(self.counts[order])

        return self._cached(self._shards, epoch, make, 2)

    def _block(self, epoch: int, b: int) -> np.ndarray:
        n = min(self.block, self.total - b * self.block)
        return self._cached(self._blocks, (epoch, b), lambda: random_order(n, self.seed, "block", epoch, b), 4)

    def locate(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard numbers, usable-sample numbers within them) of positions [start, stop) of `epoch`."""
        if not 0 <= start <= stop <= self.total:
            raise IndexError(f"positions [{start}, {stop}) outside the epoch's {self.total} samples")
        pos = np.arange(start, stop, dtype=np.int64)
        seq = np.empty_like(pos)
        for b in range(start // self.block, (stop - 1) // self.block + 1 if stop > start else 0):
            sel = (pos >= b * self.block) & (pos < (b + 1) * self.block)
            seq[sel] = b * self.block + self._block(epoch, b)[pos[sel] - b * self.block]
        order, cum = self._shard_order(epoch)
        k = np.searchsorted(cum, seq, side="right")
        shard = order[k]
        return shard, seq - (cum[k] - self.counts[shard])


class TrainData:
    """The usable samples of a shard list and the epoch order over them; the epoch length is theirs.

    Raises DataError for a fatal problem, or (without skip_bad) for any bad shard or sample, listing them;
    with skip_bad, what is skipped is listed on stderr (`report`: one rank is enough).
    """

    def __init__(
        self, shards: list[str], *, seed: int, global_batch: int, block: int, skip_bad: bool, report: bool = True,
        data_size: int | None = None, max_caption_bytes: int | None = None, before_survey=None,
    ):
        self.shards, self.seed, self.B, self.skip_bad = list(shards), seed, global_batch, skip_bad
        # an id at or above data_size is a bad sample, as `neuclip data check` says (skipped under skip_bad)
        # `before_survey()` runs only when this data-set version has no stored survey (make_data: build indexes)
        source = data_size_source(self.shards, data_size) if data_size is not None else ""
        sv = cached_survey(self.shards, before_survey, data_size=data_size, data_size_from=source,
                           caption_limit=max_caption_bytes)
        fatal = [p for p in sv.problems if p.fatal]
        if fatal or (sv.problems and not skip_bad):
            raise DataError(_listing(fatal or sv.problems, skippable=not fatal))
        for p in sv.problems[:20] if report else []:
            print(f"neuclip data: skipped ({'shard' if p.key is None else 'sample'}): {p.named()}", file=sys.stderr)
        if report and len(sv.problems) > 20:
            print(f"neuclip data: ... {len(sv.problems) - 20} more skipped (see `neuclip data check`)", file=sys.stderr)
        self.survey = sv
        self.bad_samples = sum(p.key is not None for p in sv.problems)
        self.bad_shards = sum(p.key is None for p in sv.problems)
        self.order = EpochOrder(sv.counts, seed, block)
        self.num_samples = self.order.total
        self.steps_per_epoch = self.num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the {len(self.shards)} shard(s) hold {self.num_samples} usable samples, fewer than "
                f"train.global_batch_size ({global_batch}): add shards or lower the batch size"
            )
        self.max_id = sv.max_id
        self._indexes: OrderedDict = OrderedDict()
        self.max_caption_bytes = max_caption_bytes
        self.captions_cut = sv.captions_over  # counted from the index while surveying: no second pass
        if report and self.captions_cut:
            print(f"neuclip data: {self.captions_cut} caption(s) longer than {max_caption_bytes} bytes are cut to "
                  "that length before tokenising (data.max_caption_bytes)", file=sys.stderr)

    def fingerprint(self) -> str:
        """Changes when the shard list or any shard's usable samples change (a resume must then stop)."""
        h = hashlib.blake2b(digest_size=12)
        for shard, n, c in zip(self.shards, self.survey.samples, self.survey.counts):
            h.update(f"{os.path.basename(shard)}:{n}:{c};".encode())
        return h.hexdigest()

    def index(self, shard: int):
        """The shard's index (offsets), loaded lazily and kept for the most recent 256 shards."""
        return EpochOrder._cached(self._indexes, shard, lambda: shard_index(self.shards[shard]), 256)

    def positions(self, step: int, rank: int = 0, world: int = 1) -> tuple[int, int, int]:
        """(epoch, first position, stop) of rank `rank`'s part of global batch `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        local = self.B // world
        start = k * self.B + rank * local
        return epoch, start, start + local


def _listing(problems: list[Problem], skippable: bool) -> str:
    head = "; ".join(p.named() for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    fix = (
        "run `neuclip data check` on the shards for the full list; set data.skip_bad=true to skip and count "
        "such samples"
        if skippable
        else "missing shards and count mismatches are never skipped: fix them or the pattern"
    )
    return f"{len(problems)} problem(s) in the training data: {head}{more}. {fix}"


class FastTrainTransform:
    """open_clip's train transform (RandomResizedCrop bicubic, RGB, ToTensor, Normalize) on uint8 tensors.

    The crop box is drawn by torchvision's own `RandomResizedCrop.get_params` (same random draws, so the same
    box for the same seed); the bicubic antialiased resize runs on the uint8 crop with torch's vectorised
    kernel (about 4x faster than PIL's here, values within a level or two of PIL's), then one fused
    normalisation. `match` returns None for any other transform, which is then applied as it is.
    """

    def __init__(self, size, scale, ratio, mean, std):
        self.size, self.scale, self.ratio = list(size), list(scale), list(ratio)
        std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.mul = 1.0 / (255.0 * std)
        self.sub = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std

    @classmethod
    def match(cls, transform) -> FastTrainTransform | None:
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 3:
            return None
        rrc, middle, norm = steps[0], steps[1:-1], steps[-1]
        if not (
            isinstance(rrc, T.RandomResizedCrop)
            and rrc.interpolation == T.InterpolationMode.BICUBIC
            and rrc.antialias in (True, None)
            and isinstance(norm, T.Normalize)
            and len(middle) >= 1
            and isinstance(middle[-1], T.ToTensor)
            and all(type(m).__name__ == "MaybeConvertMode" and m.mode == "RGB" for m in middle[:-1])
        ):
            return None
        return cls(rrc.size, rrc.scale, rrc.ratio, norm.mean, norm.std)

    def crop(self, image: Image.Image) -> torch.Tensor:
        """The random resized crop as uint8 (3, H, W): crop first, then resize only the crop."""
        from torchvision.transforms import RandomResizedCrop

        i, j, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[:, i : i + h, j : j + w]
        return torch.nn.functional.interpolate(x.unsqueeze(0), self.size, mode="bicubic", antialias=True)[0]

    def __call__(self, image: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 (3, H, W), written into `out` (a row of the batch) when given: no extra copy."""
        out = torch.empty((3, *self.size)) if out is None else out
        return torch.mul(self.crop(image), self.mul, out=out).sub_(self.sub)


def _batch_tensor(shape) -> torch.Tensor:
    """An empty float32 batch; in a loader worker, in shared memory from the start (as torch's default_collate
    does), so handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape)
    storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0).new(storage).view(shape)


class BatchDataset(Dataset):
    """Item `step` = this rank's part of global batch `step`: images, tokens, ids, undecodable samples."""

    def __init__(self, data: TrainData, *, rank: int, world: int, transform, tokenizer):
        self.data, self.rank, self.world = data, rank, world
        self.transform, self.tokenizer = transform, tokenizer
        self.fast = FastTrainTransform.match(transform) if transform is not None else None
        self.reader = MemberReader()

    def _image(self, index, i: int, shard: str, key: str, epoch: int, p: int):
        ext = IMAGE_EXTS[index.image_ext[i]]
        try:
            return open_image(self.reader.read(shard, *map(int, index.image[i])), ext), None
        except BadImage as err:
            named = Problem(shard, key, str(err)).named()
            if not self.data.skip_bad:
                raise DataError(f"{named} (set data.skip_bad=true to skip it)") from None
            return Image.new("RGB", (64, 64)), (named if epoch == 0 else None)

    def _caption(self, shard: str, index, i: int) -> str:
        """The caption, read up to data.max_caption_bytes (a cut inside a multi-byte character drops it)."""
        offset, size = map(int, index.text[i])
        limit = self.data.max_caption_bytes
        if limit and size > limit:
            return self.reader.read(shard, offset, limit).decode("utf-8", errors="ignore")
        return self.reader.read(shard, offset, size).decode("utf-8")

    def __getitem__(self, step: int) -> dict:
        epoch, start, stop = self.data.positions(step, self.rank, self.world)
        shards, nth = self.data.order.locate(epoch, start, stop)
        images, texts, ids, bad = [], [], [], []
        batch = _batch_tensor((stop - start, 3, *self.fast.size)) if self.fast else None
        rng = torch.default_generator.get_state()  # per-sample seeds must not disturb the caller's RNG
        try:
            for row, (p, s, n) in enumerate(zip(range(start, stop), shards.tolist(), nth.tolist())):
                index, shard = self.data.index(s), self.data.shards[s]
                usable = self.data.survey.usable[s]
                i = n if usable is None else int(usable[n])
                key = index.key(i)
                try:
                    texts.append(self._caption(shard, index, i))
                except ShardError as err:
                    raise DataError(f"{err}: the shard changed since it was indexed; rerun") from None
                image, problem = self._image(index, i, shard, key, epoch, p)
                if problem:
                    bad.append(problem)
                torch.default_generator.manual_seed(mix(self.data.seed, "augment", epoch, p))
                if self.fast:
                    self.fast(image, out=batch[row])
                else:
                    images.append(self.transform(image) if self.transform is not None else image)
                ids.append(int(index.ids[i]))
        finally:
            torch.default_generator.set_state(rng)
        return {
            "step": step,
            "image": batch if self.fast else torch.stack(images) if self.transform is not None else images,
            "text": self.tokenizer(texts) if self.tokenizer is not None else texts,
            "ids": torch.tensor(ids, dtype=torch.int64),
            "bad": bad,
        }


def _worker_init(_):
    torch.set_num_threads(1)


class TrainLoader:
    """This rank's local batches from step `start` on, and the data state a checkpoint keeps.

    `bad_decoded`: undecodable images met so far (the checkpoint's value, so counts survive restarts).
    """

    def __init__(
        self,
        data: TrainData,
        *,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        start: int = 0,
        bad_decoded: int = 0,
        transform=None,
        tokenizer=None,
        pin_memory: bool = False,
    ):
        if data.B % world:
            raise DataError(f"train.global_batch_size ({data.B}) must be divisible by the world size ({world})")
        self.data, self.step, self.bad_decoded = data, start, bad_decoded
        self.dataset = BatchDataset(data, rank=rank, world=world, transform=transform, tokenizer=tokenizer)
        kwargs = {"prefetch_factor": 2, "worker_init_fn": _worker_init} if workers > 0 else {}
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=itertools.count(start),
            num_workers=workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),  # its base seed must not be drawn from the global RNG
            **kwargs,
        )
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = next(self._it)
        if int(item["step"]) != self.step:
            raise RuntimeError(f"data loader returned step {int(item['step'])}, expected {self.step}")
        self.step += 1
        for problem in item["bad"]:
            self.bad_decoded += 1
            print(f"neuclip data: skipped (image): {problem}", file=sys.stderr, flush=True)
        return item["image"], item["text"], item["ids"]

    def _decoded_total(self) -> int:
        """Undecodable images met so far by every rank (collective when distributed)."""
        import torch.distributed as dist

        bad = torch.tensor(self.bad_decoded, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        return int(bad)

    def bad_counts(self) -> dict:
        """Bad samples (left out by the survey, plus undecodable images met) and bad shards; collective."""
        return {"bad_samples": self.data.bad_samples + self._decoded_total(), "bad_shards": self.data.bad_shards,
                "captions_cut": self.data.captions_cut}

    def state(self) -> dict:
        """The checkpoint's data entry: the next step, and what the order depends on (checked on resume).
        Collective when distributed (the undecodable counts are summed; rank 0 carries the sum on resume)."""
        return {
            "order": ORDER,
            "next_step": self.step,
            "global_batch": self.data.B,
            "block": self.data.order.block,
            "num_samples": self.data.num_samples,
            "fingerprint": self.data.fingerprint(),
            "bad_decoded": self._decoded_total(),
        }

    def close(self) -> None:
        it, self._it = self._it, None
        del it
        self.dataset.reader.close()


def resume_point(state: dict | None, data: TrainData, rank: int, source: str) -> tuple[int, int]:
    """(start step, this rank's undecodable count) from a checkpoint's data entry; refuses what cannot follow.

    The sum of undecodable images is carried by rank 0 alone, so it survives a change of world size.
    """
    if state is None:
        return 0, 0
    if "order" not in state:
        raise DataError(
            f"{source} was written by the earlier slot-based data loader (its data order depended on the "
            "number of loader workers) and cannot be continued in this version's order: start a new run_dir"
        )
    expected = {
        "order": ORDER,
        "global_batch": data.B,
        "block": data.order.block,
        "num_samples": data.num_samples,
        "fingerprint": data.fingerprint(),
    }
    diff = [f"{k}: {state.get(k)!r} -> {v!r}" for k, v in expected.items() if state.get(k) != v]
    if diff:
        raise DataError(
            f"{source} read the data in another order or from other shards ({'; '.join(diff)}): the shards or "
            "their usable samples changed since it was written; restore them, or start a new run_dir"
        )
    return int(state["next_step"]), int(state["bad_decoded"]) if rank == 0 else 0
