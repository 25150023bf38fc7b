"""Two gloo processes on a split global batch == one process on the whole batch, for every estimator.

A tiny linear "encoder" (wrapped in DDP in the 2-process run) feeds each estimator for three steps with a
plain SGD step on the encoder and on the estimator's own encoder-block parameters (their gradients averaged
over ranks, as the trainer does). Compared after every step: the loss (mean over ranks), the encoder's
parameter gradients and the estimator's whole state_dict.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from neuclip.estimators import Batch, EstimatorContext, build_estimator, method_names

pytestmark = pytest.mark.slow  # 2 gloo processes per case

B, D_IN, D, STEPS, N = 8, 6, 4, 3, 24


def make_data(seed: int = 0, steps: int = STEPS, n: int = N):
    """`steps` batches of B correlated (x, y) pairs with B distinct ids from [0, n)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, D_IN, generator=gen) for _ in range(steps)]
    ys = [x + 0.3 * torch.randn(B, D_IN, generator=gen) for x in xs]
    ids = [torch.randperm(n, generator=gen)[:B] for _ in range(steps)]
    return xs, ys, ids


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.img = torch.nn.Parameter(torch.randn(D_IN, D, generator=gen))
        self.txt = torch.nn.Parameter(torch.randn(D_IN, D, generator=gen))

    def forward(self, x, y):
        return F.normalize(x @ self.img, dim=1), F.normalize(y @ self.txt, dim=1)


def options(method):
    return {"num_prototypes": 8, "restart_every": 2} if method == "neuclip" else {}


def train(method, rank=0, world=1):
    enc = Encoder()
    model = torch.nn.parallel.DistributedDataParallel(enc) if world > 1 else enc
    ctx = EstimatorContext(embed_dim=D, data_size=N, total_epochs=3, total_steps=STEPS, steps_per_epoch=1)
    est = build_estimator(method, options(method), ctx)
    record = []
    for t, (x, y, ids) in enumerate(zip(*make_data())):
        part = slice(rank * B // world, (rank + 1) * B // world)
        est.on_epoch_start(t)
        img, txt = model(x[part], y[part])
        out = est(Batch(img, txt, ids[part], t, float(t)))
        out.loss.backward()
        loss = out.loss.detach().clone()
        own = [p for g in est.param_groups() for p in g["params"] if p.grad is not None]
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            for p in own:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        grads = [enc.img.grad.clone(), enc.txt.grad.clone()]
        with torch.no_grad():
            for p in list(enc.parameters()) + own:
                p.add_(p.grad, alpha=-0.01)
                p.grad = None
        est.after_optimizer_step()
        state = {k: v.clone() for k, v in est.state_dict().items() if torch.is_tensor(v)}
        record.append({"loss": loss, "grads": grads, "state": state})
    return record


def worker(rank, world, port, out_dir, methods=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {m: train(m, rank, world) for m in (methods or method_names())}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("method", method_names())
def test_two_processes_match_one(method, two_process_results):
    single = train(method)
    for rank_results in two_process_results:
        for t, (one, two) in enumerate(zip(single, rank_results[method])):
            torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=f"step {t} loss")
            for g2, g1 in zip(two["grads"], one["grads"]):
                torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6, msg=f"step {t} gradient")
            for key, value in one["state"].items():
                torch.testing.assert_close(
                    two["state"][key], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"step {t} state {key}"
                )
