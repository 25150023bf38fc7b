"""The distributed streaming error pass (neuclip/error_study/exact.py StreamingExact, run_error.measure_streaming)
equals the one-process pass over embeddings held in memory (exact_log_normalizers, run_error.measure).

- Kernel level: rows fed in any order and split, exact alpha* to 1e-6 (float32 inputs, float64 sums; 1e-12 in
  float64) and the mini-batch estimate of the same random partition.
- Pipeline level: 1, 2 and 3 gloo processes (with 3 ranks over 2 shards, one rank holds no data) on real shards
  and a real model give the row `measure` gives, for a per-sample estimator (sharded state in the
  multi-process runs) and for OpenCLIP's mini-batch estimate.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tests.reference as ref
from neuclip.error_study.estimates import minibatch_log_normalizers
from neuclip.error_study.exact import StreamingExact, exact_log_normalizers
from neuclip.error_study.run_error import _partition
from tests.test_estimators_distributed import free_port

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("dtype", "tau", "tol"),
    # float32 at tau 0.01: logits near 100 carry float32 rounding of ~1e-5 in either pass (a different matmul
    # shape rounds a dot product differently), the one-process pass's own accuracy there (test_error_exact.py)
    [(torch.float32, 0.07, 1e-6), (torch.float32, 0.01, 1e-5), (torch.float64, 0.07, 1e-12),
     (torch.float64, 0.01, 1e-12)],
)
def test_streamed_rows_in_any_order_give_the_exact_pass(dtype, tau, tol):
    gen = torch.Generator().manual_seed(4)
    n, batch = 700, 32
    e1, e2 = (x.to(dtype) for x in ref.correlated_pair(n, 16, gen))
    anchors = torch.randperm(n, generator=gen)[:90]
    want = exact_log_normalizers(e1, e2, tau, 1e-14, anchors=anchors, accumulate="float64")
    want_mb = minibatch_log_normalizers(e1, e2, tau, 1e-14, batch, anchors, torch.Generator().manual_seed(9))
    stream = StreamingExact(e1[anchors], e2[anchors], anchors, n, tau, 1e-14, batch_of=_partition(n, batch, 9, "cpu"),
                            batch_size=batch)
    order = torch.randperm(n, generator=gen)
    for part in torch.split(order, [1, 250, 0, 300, 149]):  # uneven, one empty, shuffled positions
        stream.add(e1[part], e2[part], part)
    (a1, a2), (m1, m2) = stream.result()
    for got, exp in ((a1, want[0]), (a2, want[1])):
        torch.testing.assert_close(got, exp.to(got.dtype), rtol=tol, atol=tol)
    for got, exp in ((m1, want_mb[0]), (m2, want_mb[1])):
        assert torch.equal(got.isnan(), exp.isnan()) and bool(got.isnan().any())  # n mod B slots: no estimate
        # both are stored in float32; from float32 inputs the in-memory one also computes in float32 (rounding
        # of s_ij / tau, as above), the streamed one in float64
        f32 = dtype == torch.float32
        torch.testing.assert_close(got, exp, rtol=2e-6 if f32 else 1e-6, atol=max(tol, 4e-6) if f32 else 1e-6,
                                   equal_nan=True)


def test_missing_rows_are_an_error():
    x = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    stream = StreamingExact(x[:2], x[:2], torch.arange(2), 10, 0.1, 1e-14)
    stream.add(x[:9], x[:9], torch.arange(9))
    with pytest.raises(ValueError, match="9, expected n = 10"):
        stream.result()


def _setup(synth_data, method: str, world: int):
    from neuclip.estimators import EstimatorContext, build_estimator
    from neuclip.export import create_model

    torch.manual_seed(0)
    model, _, eval_tf, tokenizer = create_model("tiny-vit")
    model.eval()
    options = {"state_placement": "sharded"} if method == "fastclip" else {}
    from neuclip.data.keys import read_info

    data_size = read_info(synth_data / "train")["data_size"]  # 216: img2dataset's keys 0..15, 100..115, 200..215
    est = build_estimator(method, options, EstimatorContext(embed_dim=32, data_size=data_size))
    if method == "fastclip":  # a state for the first 40 samples, ids < 208 (the rest never visited: NaN)
        ids = torch.arange(data_size)
        full = torch.where(ids < 208, torch.sin(ids.float()) - 2.0, float("nan"))
        own = est.layout.owned(ids)
        est.a1.copy_(full[own])
        est.a2.copy_(full[own] * 0.5)
    shards = [str(synth_data / "train" / f"{k:05d}.tar") for k in range(2 if world == 3 else 3)]
    return model, eval_tf, tokenizer, est, shards


def _row(model, eval_tf, tokenizer, est, shards, rank, world):
    from neuclip.error_study.run_error import measure_streaming

    return measure_streaming(est, model, eval_tf, tokenizer, shards, anchors=20, train_batch=8, seed=3,
                             embed_batch=5, device="cpu", embed_dim=32, workers=0, rank=rank, world=world)


def _worker(rank, world, port, out_dir, synth_data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = {m: _row(*_setup(synth_data, m, world), rank, world) for m in ("fastclip", "openclip")}
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _in_memory_row(synth_data, method: str, shards_of_world: int):
    from neuclip.error_study.run_error import anchor_positions, embed_shards, measure, sort_by_id

    model, eval_tf, tokenizer, est, shards = _setup(synth_data, method, shards_of_world)
    image, text, ids = sort_by_id(*embed_shards(model, eval_tf, tokenizer, shards, 5, "cpu"))
    return measure(est, image, text, ids, anchor_positions(image.shape[0], 20, 3), 8, 3)


@pytest.mark.slow  # 1-3 gloo processes
@pytest.mark.parametrize("world", [1, 2, 3])
def test_streaming_pass_on_1_2_3_processes_equals_the_one_process_pass(world, synth_data, tmp_path):
    if world == 1:
        got = [{m: _row(*_setup(synth_data, m, 1), 0, 1) for m in ("fastclip", "openclip")}]
    else:
        mp.spawn(_worker, args=(world, free_port(), str(tmp_path), synth_data), nprocs=world, join=True)
        got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for method in ("fastclip", "openclip"):
        want = _in_memory_row(synth_data, method, world)
        assert want["n"] == (32 if world == 3 else 48)
        for rows in got:
            row = rows[method]
            assert row.keys() == want.keys() and row["n"] == want["n"] and row["anchors"] == 20
            for key, value in want.items():
                if isinstance(value, float) and math.isfinite(value):
                    assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (method, key)
            assert 0 < row["coverage"] <= 1


def test_an_image_that_does_not_decode_is_left_out_as_in_the_one_process_pass(synth_data, tmp_path):
    """With skip_bad, an undecodable image is only found while embedding; the pass then runs again without it,
    so n and the anchors are those of the one-process pass, which never held it."""
    import shutil

    from neuclip.error_study.run_error import anchor_positions, embed_shards, measure, sort_by_id
    from tests.test_train_resume import _corrupt_image

    data = tmp_path / "data"
    shutil.copytree(synth_data / "train", data)
    _corrupt_image(data / "00001.tar", 3)
    for method in ("fastclip", "openclip"):
        model, eval_tf, tokenizer, est, _ = _setup(synth_data, method, 1)
        shards = [str(data / f"{k:05d}.tar") for k in range(3)]
        image, text, ids = sort_by_id(*embed_shards(model, eval_tf, tokenizer, shards, 5, "cpu", skip_bad=True))
        want = measure(est, image, text, ids, anchor_positions(image.shape[0], 20, 3), 8, 3)
        from neuclip.error_study.run_error import measure_streaming

        got = measure_streaming(est, model, eval_tf, tokenizer, shards, anchors=20, train_batch=8, seed=3,
                                embed_batch=5, device="cpu", embed_dim=32, skip_bad=True)
        assert got["n"] == want["n"] == 47
        for key, value in want.items():
            if isinstance(value, float) and math.isfinite(value):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (method, key)
