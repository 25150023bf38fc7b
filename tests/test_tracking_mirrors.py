"""train.report_to: TensorBoard and W&B (offline) hold what metrics.jsonl and error_curve.jsonl hold.

TensorBoard's event files are read back with its own EventAccumulator; the W&B offline run's transaction
log (`run-<id>.wandb`, LevelDB log framing of wandb's protobuf Records) with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import torch

from neuclip.train.config import ConfigError
from neuclip.train.runfiles import Mirrors, scalars
from neuclip.train.testing import tiny_config, train_pattern

torch.set_num_threads(1)


def _tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(run_file) -> list[dict]:
    """History rows of an offline W&B run: the file is 7 header bytes, then 32 KiB blocks of records framed
    as (crc32, length, type) with type 1 = whole, 2/3/4 = first/middle/last piece."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, piece, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        piece = chunk if kind in (1, 2) else piece + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected(run) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for prefix, name in (("train", "metrics.jsonl"), ("error", "error_curve.jsonl")):
        for rec in _lines(run / name):
            for k, v in scalars(rec).items():
                out.setdefault(f"{prefix}/{k}", []).append((rec["step"], v))
    return out


def test_tensorboard_and_wandb_equal_the_jsonl_files(synth_data, tmp_path, monkeypatch):
    from neuclip.error_study.tracking import train

    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline
    pattern = train_pattern(synth_data)
    extra = {"method.name": "fastclip", "train.max_steps": 6, "error.every": 3, "error.anchors": 8}
    train(tiny_config(tmp_path / "plain", pattern, **extra))
    run = tmp_path / "run"
    train(tiny_config(run, pattern, **extra, **{"train.report_to": ["jsonl", "tensorboard", "wandb"]}))

    # the mirrors do not change the run
    assert [r["loss"] for r in _lines(run / "metrics.jsonl")] == [r["loss"] for r in _lines(tmp_path / "plain" /
                                                                                          "metrics.jsonl")]
    expected = _expected(run)
    assert {"train/loss", "train/samples_per_s", "error/mse_log"} <= set(expected)
    assert [s for s, _ in expected["error/mse_log"]] == [3, 6]

    tb = _tb_scalars(run / "tensorboard")
    assert set(tb) == set(expected)
    for tag, points in expected.items():  # TensorBoard stores float32
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        np.testing.assert_array_equal([v for _, v in tb[tag]], np.float32([v for _, v in points]), err_msg=tag)

    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # offline: nothing was sent anywhere
    history = _wandb_history(runs[0])
    logged: dict[str, list] = {}
    for row in history:
        for k, v in row.items():
            if not k.startswith("_"):
                logged.setdefault(k, []).append((row["_step"], v))
    assert logged == expected


def test_resume_hides_the_dead_attempts_later_events(tmp_path):
    """A crash after step 6 and a resume from the checkpoint at step 4: TensorBoard shows steps 1..6 once,
    steps 5 and 6 from the second attempt."""
    first = Mirrors(tmp_path, ["tensorboard"], 0, None)
    for step in range(1, 7):
        first.log("train", {"step": step, "loss": float(step)})
    first.close()
    second = Mirrors(tmp_path, ["tensorboard"], 4, None)
    for step in (5, 6):
        second.log("train", {"step": step, "loss": 10.0 * step})
    second.close()
    assert _tb_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60)]


def test_error_curve_lines_are_forwarded_whole(tmp_path):
    mirrors = Mirrors(tmp_path, ["tensorboard"], 0, None)
    curve = tmp_path / "error_curve.jsonl"
    curve.write_text(json.dumps({"step": 3, "mse_log": 0.5, "method": "x"}) + "\n" + '{"step": 6, "mse')
    mirrors.poll_curve()  # the half-written line waits
    with open(curve, "a") as f:
        f.write('_log": 0.25}\n')
    mirrors.close()
    assert _tb_scalars(tmp_path / "tensorboard") == {"error/mse_log": [(3, 0.5), (6, 0.25)]}


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_missing_package_is_a_clear_error(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb" if package == "wandb" else "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=f"train.report_to has {package} but the {package} package is missing"):
        Mirrors(tmp_path, [package], 0, None)


def test_report_to_is_checked(synth_data, tmp_path):
    pattern = train_pattern(synth_data)
    with pytest.raises(ConfigError, match="'train.report_to.1' must be one of jsonl, tensorboard, wandb"):
        tiny_config(tmp_path / "r", pattern, **{"train.report_to": ["jsonl", "mlflow"]})
    assert tiny_config(tmp_path / "r", pattern)["train"]["report_to"] == ["jsonl"]
