"""Procedural image-caption data on which zero-shot evaluation means something.

Each scene is one or two simple shapes on a plain background; the caption names some of the attributes that
generated it (shape, colour, size, grid position, background, relative placement), through varied templates.
A model that learns to align images and captions can then be scored zero-shot on held-out sets whose labels
are those same attributes (shape, colour, position) and on caption retrieval.

Output layout (img2dataset for training, clip_benchmark `wds/` for evaluation), see `synthesize`. The train
shards hold exactly what img2dataset writes (members, .json fields, .parquet and _stats.json sidecars; checked
against a real img2dataset run in tests/test_data_download.py), keys included: sample i is row i % shard_size
of shard i // shard_size, keyed as img2dataset keys that row (neuclip/data/keys.py). Unless the shard size is a
power of ten the ids have gaps between shards, and data_size (max id + 1, written to train/dataset.yaml as
`neuclip data download` writes it) is larger than num_train.
Everything is a pure function of (seed, stream, sample index): shards are byte-identical across runs, a
sample's content (image, caption, scene, url) does not depend on `shard_size` (only its key does), and each
evaluation set has its own seed stream, disjoint from training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from neuclip.data.index import shard_index
from neuclip.data.keys import INFO, contiguous_rows, img2dataset_key, key_scheme, key_space
from neuclip.data.shards import key_width, write_tar

VERSION = 3  # bump when the same seed would produce different data (3: img2dataset's keys)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (235, 235, 235), "black": (25, 25, 25)}
SIZES = {"small": 0.3, "large": 0.5}  # diameter as a fraction of the image side
ROWS, COLS = ("top", "centre", "bottom"), ("left", "centre", "right")
POSITIONS = tuple("centre" if r == c == "centre" else f"{r} {c}" for r in ROWS for c in COLS)
TWO_OBJECTS_P = 0.3
SUPERSAMPLE = 4  # draw big, then downsample: anti-aliased edges keep shapes recognisable at 32 px

# Fixed seed streams: train and each eval set draw from their own, so eval scenes are never train scenes.
STREAMS = {"train": 0, "synth_shape": 1, "synth_colour": 2, "synth_position": 3, "synth_retrieval": 4}

# Zero-shot classification sets: (attribute, class names, prompt templates). Templates put {c} where train
# captions put the attribute, and avoid an article before it ("a orange").
CLASSIFICATION = {
    "synth_shape": (
        "shape",
        SHAPES,
        ["a {c}.", "a photo of a {c}.", "a drawing of a {c}.", "a small {c}.", "a large {c}.", "a {c} shape."],
    ),
    "synth_colour": (
        "colour",
        tuple(COLOURS),
        ["something {c}.", "a shape coloured {c}.", "a photo of a shape coloured {c}.", "a shape in {c}."],
    ),
    "synth_position": (
        "position",
        POSITIONS,
        ["a shape in the {c}.", "a shape at the {c}.", "a photo of a shape in the {c} of the image."],
    ),
}
RETRIEVAL_CAPTIONS = 5  # captions per retrieval image, like COCO / Flickr30k


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[3 * self.row + self.col]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def attributes(self) -> dict:
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in self.objects
            ],
        }


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, two_objects_p: float = TWO_OBJECTS_P) -> Scene:
    background = _pick(rng, tuple(BACKGROUNDS))
    colours = tuple(c for c in COLOURS if c != background)  # a white square on white would be invisible
    if rng.random() >= two_objects_p:
        cell = int(rng.integers(9))
        obj = Obj(_pick(rng, SHAPES), _pick(rng, colours), _pick(rng, tuple(SIZES)), cell // 3, cell % 3)
        return Scene(background, (obj,))
    # Two small objects, distinct colours, in cells two apart in some direction so they never touch.
    pairs = [(a, b) for a in range(9) for b in range(9) if max(abs(a // 3 - b // 3), abs(a % 3 - b % 3)) == 2]
    a, b = _pick(rng, pairs)
    c1, c2 = (colours[i] for i in rng.choice(len(colours), size=2, replace=False))
    s1 = _pick(rng, SHAPES)
    s2 = s1 if rng.random() < 0.3 else _pick(rng, SHAPES)  # same-shape pairs feed "two squares, ..."
    return Scene(background, (Obj(s1, c1, "small", a // 3, a % 3), Obj(s2, c2, "small", b // 3, b % 3)))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, centroid lowered so it looks centred
        angles = [math.radians(a) for a in (-90, 30, 150)]
        return [(cx + 1.1 * r * math.cos(a), cy + 0.15 * r + 1.1 * r * math.sin(a)) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":  # five points, fat inner radius so it stays a star at 10 px
        pts = []
        for i in range(10):
            rad, ang = (r if i % 2 == 0 else 0.5 * r), math.radians(-90 + 36 * i)
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene, with slight colour and position jitter so no two images are identical."""
    big = image_size * SUPERSAMPLE

    def jitter(rgb, amount):
        return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)

    img = Image.new("RGB", (big, big), jitter(BACKGROUNDS[scene.background], 8))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        d = SIZES[o.size] * big
        margin = d / 2 + SUPERSAMPLE  # keep one output pixel of background around the object
        step = (big - 2 * margin) / 2
        wobble = 0.02 * big
        cx = margin + o.col * step + rng.uniform(-wobble, wobble)
        cy = margin + o.row * step + rng.uniform(-wobble, wobble)
        r, fill = d / 2, jitter(COLOURS[o.colour], 15)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = 0.85 * r  # a square of the same width looks bigger than a circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "cross":
            t = r / 3
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


ONE = [
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape} on a {bg} background",
    "there is a {size} {colour} {shape} {where}",
    "a picture of a {colour} {shape} {where}",
    "a {size} {shape} coloured {colour}",
    "a {shape} in {colour} {where}",
    "{size} {colour} {shape} on {bg}",
    "a {bg} image with a {colour} {shape} {where}",
    "an illustration of a {size} {shape} coloured {colour} {where}",
    "a {shape}, {colour}, {where}",
]
TWO = [
    "a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a photo of a {c1} {s1} and a {c2} {s2} on a {bg} background",
    "two shapes: a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} in the {p1} and a {c2} {s2} in the {p2}",
]
TWO_SAME = ["two {s1}s, one {c1} and one {c2}", "two {s1}s on a {bg} background, one {c1} and one {c2}"]


def _relation(a: Obj, b: Obj, rng: np.random.Generator) -> str:
    options = []
    if a.row != b.row:
        options.append("above" if a.row < b.row else "below")
    if a.col != b.col:
        options.append("to the left of" if a.col < b.col else "to the right of")
    return _pick(rng, options)


def captions(scene: Scene, rng: np.random.Generator, n: int = 1) -> list[str]:
    """n captions of the scene from distinct templates."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        where = f"{_pick(rng, ('in', 'at'))} the {o.position}"
        fields = dict(size=o.size, colour=o.colour, shape=o.shape, where=where, bg=scene.background)
        templates = ONE
    else:
        a, b = scene.objects
        if rng.random() < 0.5:
            a, b = b, a  # mention either object first
        fields = dict(c1=a.colour, s1=a.shape, p1=a.position, c2=b.colour, s2=b.shape, p2=b.position)
        fields.update(bg=scene.background, rel=_relation(a, b, rng))
        templates = TWO + TWO_SAME if a.shape == b.shape else TWO
    chosen = rng.choice(len(templates), size=n, replace=False)
    texts = [templates[i].format(**fields) for i in chosen]
    return [re.sub(r"\ba (?=[aeiou])", "an ", t).replace("crosss", "crosses") for t in texts]


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)  # libjpeg is deterministic for fixed settings
    else:
        img.save(buf, format="PNG")  # no timestamp chunk by default
    return buf.getvalue()


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], index])


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


# img2dataset's per-sample metadata fields, in its order (its downloader's `meta`, with exif and sha256 on, as
# by default); the scene attributes come first, where img2dataset puts save_additional_columns.
I2D_FIELDS = ("caption", "url", "key", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256")  # fmt: skip
ATTRIBUTES = ("background", "objects")


def _train_sample(i: int, seed: int, image_size: int, key: str) -> tuple[str, dict[str, bytes], dict]:
    """Sample i of the train stream under `key`; the content depends on i only."""
    rng = _rng(seed, "train", i)
    scene = sample_scene(rng)
    caption = captions(scene, rng)[0]
    jpg = _encode(render(scene, image_size, rng), "jpg")
    meta = scene.attributes()  # img2dataset's save_additional_columns sit before its own fields
    meta.update(caption=caption, url=f"synth:{seed}/{i}", key=key, status="success", error_message=None)
    meta.update(width=image_size, height=image_size, original_width=image_size, original_height=image_size)
    meta.update(exif="{}", sha256=hashlib.sha256(jpg).hexdigest())  # what img2dataset writes for this JPEG
    fields = {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}
    return key, fields, meta


def _write_parquet(path: Path, rows: list[dict]) -> None:
    """img2dataset's NNNNN.parquet sidecar: one row per sample, its columns and types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    obj = pa.struct([(k, pa.string()) for k in ("shape", "colour", "size", "position")])
    types = {"background": pa.string(), "objects": pa.list_(obj), "width": pa.int32(), "height": pa.int32()}
    types.update(original_width=pa.int32(), original_height=pa.int32())
    schema = pa.schema([(k, types.get(k, pa.string())) for k in ATTRIBUTES + I2D_FIELDS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_train(out: Path, num: int, seed: int, shard_size: int, image_size: int) -> tuple[list[str], int]:
    """The shards, sidecars, sizes.json and dataset.yaml; returns (shard names, data_size)."""
    out.mkdir(parents=True)
    sizes, names = {}, []
    layout = contiguous_rows(num, shard_size)
    for shard, rows in layout:
        name, start = f"{shard:05d}.tar", shard * shard_size
        made = [_train_sample(start + row, seed, image_size, img2dataset_key(shard, row, shard_size))
                for row in range(rows)]  # fmt: skip
        count = write_tar(out / name, ((key, fields) for key, fields, _ in made))
        shard_index(out / name)  # the index is made where the data is made (it moves with the folder)
        _write_parquet(out / f"{shard:05d}.parquet", [meta for _, _, meta in made])
        # img2dataset's stats fields; the times are fixed so that the same seed gives the same bytes
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
        stats.update(duration=0.0, start_time=0.0, end_time=0.0, status_dict={"success": count})
        _write_json(out / f"{shard:05d}_stats.json", stats)
        sizes[name] = count
        names.append(name)
    _write_json(out / "sizes.json", sizes)  # open_clip's get_dataset_size reads this
    data_size = key_space(layout, shard_size)
    # The registry fields `neuclip data download` writes (neuclip/data/download.py), the shard pattern relative
    # to this folder so that the bytes do not depend on where the set is written.
    pattern = f"{{00000..{len(names) - 1:05d}}}.tar" if len(names) > 1 else names[0]
    info = {"generator": "neuclip.data.synth", "shards": pattern, "num_samples": num, "data_size": data_size,
            "key_scheme": key_scheme(shard_size)}
    (out / INFO).write_text("# written by `neuclip data synth`; registry fields: shards (relative to this folder), "
                            "num_samples, data_size\n" + yaml.safe_dump(info, sort_keys=False))  # fmt: skip
    return names, data_size


def _write_eval(out: Path, task: str, num: int, seed: int, shard_size: int, image_size: int) -> dict:
    """One clip_benchmark `wds/` set: root/test/{nshards.txt,0.tar,...} plus classnames/templates/type."""
    (out / "test").mkdir(parents=True)
    retrieval = task not in CLASSIFICATION
    width = key_width(num)

    def sample(i):
        rng = _rng(seed, task, i)
        if retrieval:
            scene = sample_scene(rng)
            fields = {"txt": "\n".join(captions(scene, rng, RETRIEVAL_CAPTIONS)).encode()}
        else:
            scene = sample_scene(rng, two_objects_p=0.0)  # one object: the label is unambiguous
            attribute, classes, _ = CLASSIFICATION[task]
            label = classes.index(getattr(scene.objects[0], attribute))
            fields = {"cls": str(label).encode()}
        fields["png"] = _encode(render(scene, image_size, rng), "png")
        return f"{i:0{width}d}", fields

    starts = range(0, num, shard_size)
    for n, start in enumerate(starts):
        write_tar(out / "test" / f"{n}.tar", (sample(i) for i in range(start, min(start + shard_size, num))))
    (out / "test" / "nshards.txt").write_text(f"{len(starts)}\n")
    if retrieval:
        (out / "dataset_type.txt").write_text("retrieval\n")
        return {"task": "zeroshot_retrieval", "num_samples": num, "captions_per_image": RETRIEVAL_CAPTIONS}
    _, classes, templates = CLASSIFICATION[task]
    (out / "classnames.txt").write_text("".join(c + "\n" for c in classes))
    (out / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in templates))
    return {"task": "zeroshot_classification", "num_samples": num, "num_classes": len(classes)}


def synthesize(
    out_dir,
    *,
    num_train: int = 4096,
    num_eval: int = 512,
    seed: int = 0,
    shard_size: int = 1024,
    image_size: int = 32,
) -> dict:
    """Generate the training shards and evaluation sets under `out_dir`; return the manifest.

    OUT/train/{00000..}.tar        KEY.jpg, KEY.txt, KEY.json (img2dataset's members and .json fields, plus
                                   the scene as extra columns); KEY = img2dataset's key of row i % shard_size
                                   of shard i // shard_size (e.g. 000010003: sample 1027, shards of 1024)
    OUT/train/00000.parquet        img2dataset's per-shard metadata sidecar (one row per sample)
    OUT/train/00000_stats.json     img2dataset's per-shard stats; OUT/train/sizes.json: shard -> count
    OUT/train/dataset.yaml         shards, num_samples, data_size (max id + 1), as `neuclip data download`
    OUT/eval/wds_synth_{shape,colour,position}   clip_benchmark wds classification sets (.png + .cls)
    OUT/eval/wds_synth_retrieval   clip_benchmark wds retrieval set (.png + .txt, 5 captions per image)
    OUT/manifest.json              what was generated

    Built in a sibling temp folder and renamed into place, so `out_dir` is either absent or complete. An
    existing `out_dir` is replaced only if it is empty or holds a previous manifest.json (never a stranger's
    folder); stale shards from a larger earlier run cannot survive the rename.
    """
    out = Path(out_dir)
    if num_train < 1 or num_eval < 1 or shard_size < 1 or image_size < 8:
        raise ValueError("need num_train, num_eval, shard_size >= 1 and image_size >= 8")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise FileExistsError(f"{out} exists, is not empty and has no manifest.json: choose another folder")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shards, data_size = _write_train(tmp / "train", num_train, seed, shard_size, image_size)
        tasks = {}
        for task in STREAMS:
            if task != "train":
                folder = f"eval/wds_{task}"
                tasks[task] = {"dataset": f"wds/{task}", "root": folder}
                tasks[task].update(_write_eval(tmp / folder, task, num_eval, seed, shard_size, image_size))
        manifest = {
            "generator": "neuclip.data.synth",
            "version": VERSION,
            "seed": seed,
            "image_size": image_size,
            "shard_size": shard_size,
            "train": {"num_samples": num_train, "data_size": data_size, "shards": [f"train/{s}" for s in shards],
                      "format": "jpg"},
            "eval": tasks,
            "vocabulary": {
                "shapes": list(SHAPES),
                "colours": list(COLOURS),
                "sizes": list(SIZES),
                "positions": list(POSITIONS),
                "backgrounds": list(BACKGROUNDS),
            },
        }
        _write_json(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
