"""What makes one sample of a shard usable: its members, caption and sample id (the one definition that
`neuclip data check`, the trainer's loader, the eval sets and the error pass share). The lowest room of the data
package: index.py builds each shard's index with it and check.py reports from it."""

from __future__ import annotations

import json
from collections.abc import Iterable

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the one list: training, checker, eval sets, error pass


def image_ext(exts: Iterable[str]) -> str | None:
    """The image member a sample is read from: the first of IMAGE_EXTS it has (None: it has none)."""
    present = set(exts)
    return next((e for e in IMAGE_EXTS if e in present), None)


def parse_id(value) -> int | None:
    """The sample id of a .json "key": a non-negative int, or a string of digits (img2dataset's form)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def record_problems(
    key: str, exts: Iterable[str], txt: bytes | None, meta: bytes | None, repeated: Iterable[str] = ()
) -> tuple[int | None, list[tuple[str, str]]]:
    """(id or None, [(kind, reason)]) of one sample from its member names, caption and .json bytes.

    kind "id" marks problems with the sample id (those do not apply to sets read without ids).
    """
    exts = list(exts)
    has = ", ".join("." + e for e in exts) or "nothing"
    problems = []
    if image_ext(exts) is None:
        problems.append(("sample", f"no image (expected one of .{', .'.join(IMAGE_EXTS)}; has {has})"))
    if txt is None:
        problems.append(("sample", f"no caption (.txt missing; has {has})"))
    else:
        try:
            if not txt.decode("utf-8").strip():
                problems.append(("sample", "empty caption (.txt holds only whitespace)"))
        except UnicodeDecodeError:
            problems.append(("sample", "caption (.txt) is not UTF-8"))
    problems += [("sample", f"member {name} appears twice in one sample") for name in repeated]
    sample_id = None
    if meta is None:
        problems.append(("id", f"no .json (the sample id is its 'key'; has {has})"))
    else:
        try:
            obj = json.loads(meta)
        except ValueError as err:
            obj, reason = None, f".json does not parse ({err})"
        else:
            reason = ".json is not an object with a 'key' (the sample id)"
        if isinstance(obj, dict) and "key" in obj:
            sample_id = parse_id(obj["key"])
            reason = f".json 'key' {obj['key']!r} is not a non-negative integer (img2dataset keys are digits)"
        if sample_id is None:
            problems.append(("id", reason))
    return sample_id, problems
