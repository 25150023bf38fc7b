"""CUDA paths, for a machine with a GPU (`make gpu-check`; on a CPU machine every test here is skipped with
that reason): bf16 autocast training on one GPU with no process group (so no NCCL), the estimators and the
exact normaliser pass on GPU against the same computation on CPU, and resume on GPU.

Not yet run anywhere: no GPU has been available to this project's sessions so far (see README).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from neuclip.error_study.exact import exact_log_normalizers
from neuclip.estimators import Batch, EstimatorContext, build_estimator, method_names
from neuclip.train import checkpoint as ckpt
from neuclip.train.testing import tiny_config, train_pattern

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make gpu-check` on one"),
]


def _gpu_config(run_dir, synth_data, method, **extra):
    return tiny_config(
        run_dir,
        train_pattern(synth_data),
        **{"method.name": method, "train.device": "cuda", "train.precision": "bf16", "train.max_steps": 12, **extra},
    )


@pytest.mark.parametrize("method", ["openclip", "siglip", "fastclip", "amorlip", "neuclip"])
def test_bf16_single_gpu_run_without_a_process_group(method, synth_data, tmp_path):
    import torch.distributed as dist

    from neuclip.error_study.tracking import train

    run = tmp_path / "run"
    done = train(_gpu_config(run, synth_data, method, **{"error.every": 6}))
    assert done["status"] == "done" and not dist.is_initialized()  # one GPU: no NCCL process group at all
    attempt = json.loads((run / "provenance.json").read_text())["attempts"][-1]
    assert attempt["device"].startswith("cuda") and attempt["precision"] == "bf16" and attempt["gpu"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    _, state = ckpt.load_latest(run / "checkpoints")
    for name, value in state["estimator"].items():  # bf16 autocast must not leak into the estimator's state
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.dtype in (torch.float32, torch.float64), (name, value.dtype)
    if method != "siglip":
        curve = [json.loads(line) for line in (run / "error_curve.jsonl").read_text().splitlines()]
        assert [r["step"] for r in curve] == [6, 12] and all(math.isfinite(r["mse_log"]) for r in curve)


def test_resume_on_gpu_continues_the_run(synth_data, tmp_path):
    from neuclip.error_study.tracking import train

    cfg = _gpu_config(tmp_path / "run", synth_data, "neuclip")
    train(cfg)
    _, full = ckpt.load_latest(tmp_path / "run" / "checkpoints")
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    again = tmp_path / "again"
    for path in ((again / "done.json"), ckpt.checkpoint_path(again / "checkpoints", 12)):
        path.unlink()
    shutil.rmtree(again / "model")
    train({**cfg, "run_dir": str(again)})  # resumes from step 8
    _, resumed = ckpt.load_latest(again / "checkpoints")
    # cuDNN/cuBLAS need not be bit-reproducible across processes; a resume must still land on the same run
    for part in ("model", "estimator"):
        for k, v in full[part].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(resumed[part][k], v, rtol=1e-3, atol=1e-4, msg=f"{part}/{k}")


@pytest.mark.parametrize("method", method_names())
def test_estimator_on_gpu_matches_cpu(method):
    gen = torch.Generator().manual_seed(0)
    b, d, n = 64, 32, 256
    image = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(b, d, generator=gen), dim=1)
    ids = torch.randperm(n, generator=gen)[:b]
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        ctx = EstimatorContext(embed_dim=d, data_size=n, total_epochs=1.0, total_steps=4, steps_per_epoch=4)
        est = build_estimator(method, {}, ctx).to(device)
        results = []
        for step in range(2):  # the second step reads the state the first one wrote
            x = image.to(device).requires_grad_(True)
            y = text.to(device).requires_grad_(True)
            loss = est(Batch(image=x, text=y, ids=ids.to(device), step=step, epoch=step / 4)).loss
            loss.backward()
            est.after_optimizer_step()
            results.append([loss.detach().cpu(), x.grad.cpu(), y.grad.cpu()])
        out[device] = results
    for got, want in zip(out["cuda"], out["cpu"]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_exact_pass_on_gpu_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20000, 64, generator=gen), dim=1)
    y = torch.nn.functional.normalize(x + torch.randn(20000, 64, generator=gen), dim=1)
    anchors = torch.randperm(20000, generator=gen)[:300]
    for tau in (0.07, 0.01):  # direct-sum and log-sum-exp paths
        cpu = exact_log_normalizers(x, y, tau, 1e-14, anchors, accumulate="float64")
        gpu = exact_log_normalizers(x.cuda(), y.cuda(), tau, 1e-14, anchors.cuda(), accumulate="float64")
        for g, c in zip(gpu, cpu):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)


def test_tiny_suite_on_gpu_matches_cpu(synth_data, tmp_path):
    from neuclip.error_study.tracking import train
    from neuclip.eval.runner import evaluate_suite

    train(_gpu_config(tmp_path / "run", synth_data, "openclip"))
    model = tmp_path / "run" / "model"
    common = {"batch_size": 16, "workers": 0, "progress": False}
    cpu = evaluate_suite(model, "tiny", synth_data, tmp_path / "cpu", device="cpu", **common)
    fp32 = evaluate_suite(model, "tiny", synth_data, tmp_path / "fp32", device="cuda", precision="fp32", **common)
    amp = evaluate_suite(model, "tiny", synth_data, tmp_path / "amp", device="cuda", precision="amp", **common)
    datacomp = evaluate_suite(model, "tiny", synth_data, tmp_path / "dc", device="cuda", **common)  # the default
    for task, entry in cpu["tasks"].items():
        assert fp32["tasks"][task]["value"] == pytest.approx(entry["value"], abs=1 / 24 + 1e-9), task  # <= 1 sample
        assert math.isfinite(amp["tasks"][task]["value"]), task
        assert math.isfinite(datacomp["tasks"][task]["value"]), task
