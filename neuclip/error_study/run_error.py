"""Normaliser error of one finished (or checkpointed) training run: `neuclip error run RUN_DIR`.

Loads the run's newest checkpoint (model + estimator state), embeds its training data in shard order with
the model's *evaluation* transform (deterministic; training saw augmented views, a small difference),
computes the exact alpha* at the estimator's current temperature for a fixed random anchor subset against all
embedded samples, and scores the method's own estimate (METHOD §6.3). Writes RUN/error/error.json and .csv.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

from neuclip.error_study.estimates import SCORED_KINDS, score
from neuclip.error_study.exact import exact_log_normalizers


@torch.no_grad()
def embed_shards(model, transform, tokenizer, pattern: str, max_samples: int | None, batch: int, device):
    """(image, text, ids) embeddings of the samples of `pattern`, in shard order."""
    from neuclip.data.shards import expand_pattern, iter_samples

    images, texts, ids, out = [], [], [], ([], [], [])

    def flush():
        if images:
            out[0].append(model.encode_image(torch.stack(images).to(device), normalize=True).float().cpu())
            out[1].append(model.encode_text(tokenizer(texts).to(device), normalize=True).float().cpu())
            out[2].append(torch.tensor(ids))
            images.clear(), texts.clear(), ids.clear()

    seen = 0
    for shard in expand_pattern(pattern):
        for sample in iter_samples(shard):
            if max_samples is not None and seen >= max_samples:
                break
            images.append(transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            texts.append(sample["txt"].decode("utf-8"))
            ids.append(int(json.loads(sample["json"])["key"]))
            seen += 1
            if len(images) == batch:
                flush()
    flush()
    return torch.cat(out[0]), torch.cat(out[1]), torch.cat(out[2])


def score_run(run_dir, anchors: int = 2048, max_samples: int | None = None, batch: int = 256, seed: int = 0):
    from neuclip.estimators import EstimatorContext
    from neuclip.estimators.registry import build_estimator
    from neuclip.export import create_model
    from neuclip.train import checkpoint as ckpt
    from neuclip.train.config import yaml_load

    run_dir = Path(run_dir)
    cfg = yaml_load((run_dir / "config.yaml").read_text())
    found = ckpt.load_latest(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint: train the run first")
    path, state = found
    model, _, eval_tf, tokenizer = create_model(cfg["model"])
    model.load_state_dict(state["model"])
    model.eval()
    method = cfg["method"]
    probe = model.encode_text(tokenizer(["x"]), normalize=True)
    ctx = EstimatorContext(embed_dim=probe.shape[1], data_size=cfg["data"]["data_size"])
    est = build_estimator(method["name"], method["options"], ctx, common=method.get("common_options"))
    est.load_state_dict(state["estimator"])
    if est.estimate_kind not in SCORED_KINDS:
        raise ValueError(f"{method['name']} has no normaliser estimate to score (estimate_kind={est.estimate_kind})")
    image, text, ids = embed_shards(model, eval_tf, tokenizer, cfg["data"]["train_shards"], max_samples, batch, "cpu")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(image.shape[0], generator=gen)[: min(anchors, image.shape[0])]
    tau, eps = est.temperature(), est.cfg.get("eps", 1e-14)
    exact = exact_log_normalizers(image, text, tau, eps, anchors=idx, accumulate="float64")
    batch_size = cfg["train"]["global_batch_size"]
    # per-sample state is indexed by sample id; score() takes positions, so map positions -> ids via `ids`
    row = score(est, image, text, ids, idx, tau, eps, batch_size, gen, exact)
    row = {
        "run": str(run_dir),
        "method": method["name"],
        "checkpoint": path.name,
        "step": int(state["step"]),
        "n": int(image.shape[0]),
        "batch_size": batch_size,
        "n_over_b": image.shape[0] / batch_size,
        "tau": tau,
        "anchors": int(idx.numel()),
        "alpha_star_mean": float(torch.cat(exact).mean()),
        **row,
    }
    out = run_dir / "error"
    out.mkdir(exist_ok=True)
    (out / "error.json").write_text(json.dumps(row, indent=2) + "\n")
    (out / "error.csv").write_text(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
    return row
