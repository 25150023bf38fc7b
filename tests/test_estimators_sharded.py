"""Sharded layouts against replicated ones (2 gloo processes): per-sample state split by sample id
(`state_placement: sharded`) and NeuCLIP's NPN block on local anchors (`npn_block: sharded`).

- Per-sample state: at the same world size the shards are bit-identical to the replicated arrays (the update
  is elementwise and the all-reduce adds exact zeros); against one process on the whole batch they agree to
  the usual 1e-5 (each rank's row of the similarity matrix is its own matmul); iSogCLR's reported temperature
  is the same number.
- NPN: after several steps (restarts included) the alphas and the encoder gradient equal the replicated
  block's to 1e-6 (the W gradient is the average of per-rank means instead of one mean: reduction order only).
  This runs in float64, where reduction order costs ~1e-15: in float32 the two differ by float32 rounding of
  alpha (~1e-6 relative at step 1), which AdaGrad's normalised first steps carry on (~1e-5 after 6 steps).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neuclip.estimators import Batch, EstimatorContext, build_estimator
from neuclip.estimators.sharding import IdShards, reshard
from tests import test_estimators_distributed as distributed
from tests.test_estimators_distributed import Encoder, free_port

pytestmark = pytest.mark.slow  # 2 gloo processes per case

B, D, STEPS, N = distributed.B, distributed.D, 6, 40  # the batch and encoder of the 1-vs-2-process tests
PER_SAMPLE = ["sogclr", "isogclr", "fastclip"]
SHARDED_KEYS = {"a1", "a2", "tau1", "tau2", "m1", "m2", "v1", "v2", "visits"}


def make_data():
    return distributed.make_data(seed=3, steps=STEPS, n=N)


def train(method, options, rank=0, world=1, dtype=torch.float32):
    enc = Encoder().to(dtype)
    model = torch.nn.parallel.DistributedDataParallel(enc) if world > 1 else enc
    ctx = EstimatorContext(embed_dim=D, data_size=N, total_epochs=STEPS, total_steps=STEPS, steps_per_epoch=1)
    est = build_estimator(method, options, ctx).to(dtype)
    record = []
    for t, (x, y, ids) in enumerate(zip(*make_data())):
        x, y = x.to(dtype), y.to(dtype)
        part = slice(rank * B // world, (rank + 1) * B // world)
        img, txt = model(x[part], y[part])
        out = est(Batch(img, txt, ids[part], t, float(t)))
        out.loss.backward()
        own = [p for g in est.param_groups() for p in g["params"] if p.grad is not None]
        if world > 1:
            for p in own:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        grads = [enc.img.grad.clone(), enc.txt.grad.clone()]
        with torch.no_grad():
            alpha = est.log_normalizers(img, txt, ids[part]) if method == "neuclip" else None
            for p in list(enc.parameters()) + own:
                p.add_(p.grad, alpha=-0.05)
                p.grad = None
        est.after_optimizer_step()
        state = {k: v.clone() for k, v in est.state_dict().items() if torch.is_tensor(v)}
        record.append({"grads": grads, "state": state, "alpha": alpha, "tau": est.temperature()})
    return record


CASES = {f"{m}-{p}": (m, {"state_placement": p}) for m in PER_SAMPLE for p in ("replicated", "sharded")}
CASES |= {f"neuclip-{b}": ("neuclip", {"num_prototypes": 8, "restart_every": 3, "npn_block": b})
          for b in ("replicated", "sharded")}


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dtype = {"neuclip": torch.float64}
        results = {name: train(m, opts, rank, world, dtype.get(m, torch.float32)) for name, (m, opts) in CASES.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assemble(ranks: list[dict], key: str) -> torch.Tensor:
    """The whole array from each rank's shard (id i at rank i % W, slot i // W)."""
    shards = [r[key] for r in ranks]
    full = torch.empty(N, dtype=shards[0].dtype)
    for rank, shard in enumerate(shards):
        full[rank::len(shards)] = shard
    return full


@pytest.mark.parametrize("method", PER_SAMPLE)
def test_sharded_state_is_the_replicated_state(method, two):
    single = train(method, {"state_placement": "replicated"})
    for t in range(STEPS):
        sharded = [two[r][f"{method}-sharded"][t] for r in range(2)]
        replicated = [two[r][f"{method}-replicated"][t] for r in range(2)]
        for key, whole in replicated[0]["state"].items():
            if key in SHARDED_KEYS:
                assert sharded[0]["state"][key].numel() == N // 2  # each rank stores half the ids
                got = assemble([s["state"] for s in sharded], key)
                torch.testing.assert_close(got, whole, rtol=0, atol=0, equal_nan=True, msg=f"step {t} {key}")
                torch.testing.assert_close(got, single[t]["state"][key], rtol=1e-5, atol=1e-6, equal_nan=True)
            else:
                for s in sharded:  # replicated entries (tau, counters) equal on every rank
                    torch.testing.assert_close(s["state"][key], whole, rtol=0, atol=0, msg=f"step {t} {key}")
        for r in range(2):
            assert sharded[r]["tau"] == replicated[r]["tau"]
            for g_s, g_r in zip(sharded[r]["grads"], replicated[r]["grads"]):
                torch.testing.assert_close(g_s, g_r, rtol=0, atol=0, msg=f"step {t} gradient")


def test_sharded_npn_block_equals_the_replicated_block(two):
    single = train("neuclip", CASES["neuclip-replicated"][1], dtype=torch.float64)
    for t in range(STEPS):
        for r in range(2):
            s, rep = two[r]["neuclip-sharded"][t], two[r]["neuclip-replicated"][t]
            for a_s, a_r in zip(s["alpha"], rep["alpha"]):
                torch.testing.assert_close(a_s, a_r, rtol=1e-6, atol=1e-6, msg=f"step {t} alpha")
            for g_s, g_r, g_1 in zip(s["grads"], rep["grads"], single[t]["grads"]):
                torch.testing.assert_close(g_s, g_r, rtol=1e-6, atol=1e-6, msg=f"step {t} encoder gradient")
                torch.testing.assert_close(g_s, g_1, rtol=1e-6, atol=1e-6)
            for key in ("npn.w1", "npn.w2"):
                torch.testing.assert_close(s["state"][key], rep["state"][key], rtol=1e-6, atol=1e-6)
                assert torch.equal(s["state"][key], two[1 - r]["neuclip-sharded"][t]["state"][key])  # same W


def test_reshard_recuts_state_for_another_world_size():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(1003, generator=gen)
    for old_world, new_world in ((3, 2), (1, 4), (5, 1), (2, 2)):
        olds = [IdShards(r, old_world, 1003) for r in range(old_world)]
        sources = [(layout, lambda layout=layout: {"a": full[layout.rank::layout.world].clone()}) for layout in olds]
        for rank in range(new_world):
            target = IdShards(rank, new_world, 1003)
            got = reshard(target, {"a": (torch.float32, float("nan"))}, sources)["a"]
            assert torch.equal(got, full[rank::new_world])
