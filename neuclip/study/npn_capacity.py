"""How well NeuCLIP's prototype NPN can represent the normaliser at all (`neuclip study npn-capacity`): a frozen
encoder, the NPN fitted to the *exact* targets, its error against tau and the number of prototypes m.

The encoder is trained once by OpenCLIP on the synthetic paired features (study/driver_run.py), then frozen;
every sample is embedded. For each tau, the exact alpha*_k(i) = log(eps + 1/(n-1) sum_{j != i} exp((s_ij -
s_ii)/tau)) over all n (float64 accumulation). For each m, a PrototypeNPN (neuclip/nets.py) starts as NeuCLIP
restarts it (W1 <- m text rows, W2 <- m image rows; with replacement plus NeuCLIP's jitter when m > n) and takes
`fit_steps` full-batch AdaGrad steps (NeuCLIP's `npn_lr`) on NeuCLIP's own unified objective with the exact
log g in place of the mini-batch one: tau mean_i [e^{-alpha_i} (eps + g*_i) + alpha_i - 1], minimised at
alpha = alpha*. So what is left is the NPN's own error, the best NeuCLIP's estimate could be with that m at that
tau (no mini-batch noise, no moving encoder). Reported: mean |alpha - alpha*| and the MSE, per modality and
averaged, before and after the fit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from neuclip.atomic import write_atomic
from neuclip.error_study.exact import exact_log_normalizers
from neuclip.error_study.plots import save
from neuclip.nets import PrototypeNPN
from neuclip.neuclip import unified_terms
from neuclip.study.driver_run import DriverRun, train

TAUS = (0.07, 0.03, 0.015, 0.01)
PROTOTYPES = (64, 256, 1024, 4096)


def _start(npn: PrototypeNPN, image: torch.Tensor, text: torch.Tensor, gen: torch.Generator, jitter: float) -> None:
    """NeuCLIP's restart: W1 <- text rows, W2 <- image rows (with replacement plus jitter when m > n)."""
    m, n = npn.w1.shape[0], image.shape[0]
    with torch.no_grad():
        for weight, source in ((npn.w1, text), (npn.w2, image)):
            if m <= n:
                weight.copy_(source[torch.randperm(n, generator=gen)[:m]])
            else:
                rows = torch.randint(n, (m,), generator=gen)
                weight.copy_(source[rows] + jitter * torch.randn(m, source.shape[1], generator=gen))


def _errors(alpha, exact) -> dict:
    out = {}
    for k, (a, b) in enumerate(zip(alpha, exact), 1):
        diff = (a.double() - b.double()).detach()
        out[f"abs_err_{k}"], out[f"mse_{k}"] = float(diff.abs().mean()), float((diff**2).mean())
    out["abs_err"], out["mse"] = (out["abs_err_1"] + out["abs_err_2"]) / 2, (out["mse_1"] + out["mse_2"]) / 2
    return out


def capacity(n: int = 4096, batch: int = 64, steps: int = 600, seed: int = 0, taus=TAUS, prototypes=PROTOTYPES,
             fit_steps: int = 300, npn_lr: float = 0.05, eps: float = 1e-14, jitter: float = 0.01,
             progress=print) -> pd.DataFrame:
    torch.set_num_threads(1)
    data, encoder, _, _, _ = train(DriverRun("openclip", n, batch, steps, seed=seed))
    encoder.eval()
    with torch.no_grad():
        image, text = encoder(*data.features(torch.arange(n)))
    pos = (image * text).sum(1)
    rows = []
    for tau in taus:
        exact = exact_log_normalizers(image, text, tau, eps, accumulate="float64")
        for m in prototypes:
            t0 = time.perf_counter()
            npn = PrototypeNPN(image.shape[1], m)
            _start(npn, image, text, torch.Generator().manual_seed(seed), jitter)
            opt = torch.optim.Adagrad(npn.parameters(), lr=npn_lr)
            before = _errors(npn(image, text, pos, 1.0 / tau, eps), exact)
            log_g = [e.float() for e in exact]
            for _ in range(fit_steps):
                opt.zero_grad(set_to_none=True)
                a1, a2 = npn(image, text, pos, 1.0 / tau, eps)
                loss = tau * (unified_terms(log_g[0], a1) + unified_terms(log_g[1], a2)).mean()
                loss.backward()
                opt.step()
            after = _errors(npn(image, text, pos, 1.0 / tau, eps), exact)
            rows.append({"tau": tau, "m": m, "n": n, "fit_steps": fit_steps, **after,
                         **{f"{k}_at_start": v for k, v in before.items() if k in ("abs_err", "mse")},
                         "alpha_star_mean": float(torch.cat(exact).mean()), "seconds": time.perf_counter() - t0})
            progress(f"npn-capacity: tau {tau:g} m {m}: |alpha - alpha*| {after['abs_err']:.3f} "
                     f"(start {before['abs_err']:.3f})")
    return pd.DataFrame(rows)


def write(frame: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "npn_capacity.csv", frame.to_csv(index=False))
    table = frame.pivot(index="m", columns="tau", values="abs_err").sort_index(axis=1, ascending=False)
    lines = ["| m | " + " | ".join(f"tau {t:g}" for t in table.columns) + " |",
             "|---:|" + "---:|" * len(table.columns)]
    lines += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for m, row in table.iterrows()]
    write_atomic(out / "npn_capacity.md", "Mean |alpha - alpha*| (nats) of the prototype NPN fitted to exact "
                 "targets on a frozen encoder (neuclip/study/npn_capacity.py)\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for tau, part in frame.groupby("tau"):
        part = part.sort_values("m")
        ax.plot(part["m"], part["abs_err"], marker="o", label=f"tau {tau:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prototypes m")
    ax.set_ylabel("mean |alpha - alpha*| (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Prototype NPN fitted to exact targets")
    save(fig, out / "npn_capacity")


def main(out: str | Path, **kwargs) -> pd.DataFrame:
    frame = capacity(**kwargs)
    write(frame, Path(out))
    return frame

