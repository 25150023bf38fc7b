"""The one interface between the trainer and a normaliser estimator.

The trainer knows nothing method-specific. Each step it hands the estimator the *local* L2-normalised
embeddings (with grad), their global sample ids, the step and the fractional epoch. The estimator gathers the
global batch itself (with grad, so that DDP's gradient average equals the single-process gradient on the
whole global batch), runs its own inner block (per-sample state update, NPN steps, lambda-net steps) and
returns the loss for the encoder/temperature block.

Conventions every estimator follows (see docs/method.md §1):
- `h_ij = (s_ij - s_ii) / tau`, the mini-batch normaliser `g_hat_i = 1/(B-1) sum_{j != i} exp(h_ij)`, and
  the log-normaliser `alpha_i = log(eps + g_i)`. k = 1 is the image anchor, k = 2 the text anchor.
- The returned loss is a *surrogate*: its gradient is the method's gradient estimator. Its value is replaced
  (gradient-neutrally) by the method's own estimate of its objective, so that logged losses mean something.
- Maths in float32 or wider, whatever precision the encoders ran in; per-sample state in `state_dtype`.
- All state (buffers, inner optimisers, RNG, counters) is in `state_dict()`, so a resume is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from neuclip.estimators.options import Option


@dataclass
class Batch:
    image: torch.Tensor  # (b, d) local image embeddings, L2-normalised, requires grad
    text: torch.Tensor  # (b, d) local text embeddings, L2-normalised, requires grad
    ids: torch.Tensor  # (b,) int64 global sample ids (the webdataset .json "key")
    step: int  # optimisation step, 0-based
    epoch: float  # fractional epoch: samples seen / samples per epoch


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar surrogate to backpropagate
    stats: dict[str, float] = field(default_factory=dict)  # detached numbers for the metrics log


@dataclass(frozen=True)
class ShardedState:
    """Per-sample arrays split by sample id (neuclip/estimators/sharding.py): their state_dict keys and fill
    values (what an id never visited holds), this rank's place and the array length before the split."""

    fills: dict[str, float]  # state_dict key -> value of an unvisited id
    rank: int
    world: int
    data_size: int


@dataclass
class EstimatorContext:
    """What an estimator may know about the run it is part of."""

    embed_dim: int
    data_size: int = 0  # max sample id + 1 (may exceed the number of samples present)
    num_samples: int = 0  # samples present (train_num_samples); 0 when unknown
    total_epochs: float = 1.0
    total_steps: int = 1
    steps_per_epoch: int = 1


class Estimator(nn.Module):
    """Base class. A subclass declares what the rest of the harness derives from it, and implements `forward`.

    Declared per class (the registry, the schema enums, the report and the error study read these; nothing
    else lists methods):
      name          registry name (what configs write)
      label         the report's row label; `labels()`/`label_for()` when options change it (FastCLIP-vN)
      description   one line for `neuclip methods`
      estimate_kind how the error study reads this method's log-normaliser estimate (docs/method.md §6.3):
                    "state": `log_normalizers()` returns stored/predicted alphas; "minibatch": log(eps + g_hat)
                    from a random batch of the training batch size; anything else is not scored
                    ("none": no normaliser, SigLIP; "per_sample_tau": iSogCLR's estimates live at
                    per-sample temperatures)
      colour        matplotlib colour of its curves
      shadow        options of its shadow copy in the error-study sweep, or None for no shadow by default
      order         position in every method table (ascending)
      options       {key: Option}: the one declaration of its options (type, range, default, help)
    """

    name: str = ""
    label: str = ""
    description: str = ""
    estimate_kind: str = "state"
    colour: str | None = None
    shadow: dict | None = None
    order: float = 100.0
    options: dict[str, Option] = {}
    defaults: dict = {}  # derived from `options` for every subclass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.defaults = {key: opt.default for key, opt in cls.options.items()}

    @classmethod
    def labels(cls) -> tuple[str, ...]:
        """Every label this method's runs can carry in a table."""
        return (cls.label or cls.name,)

    @classmethod
    def label_for(cls, options: dict | None) -> str:
        """The label of a run with these (explicit) options."""
        return cls.label or cls.name

    @classmethod
    def check_context(cls, options: dict, ctx: EstimatorContext, global_batch: int) -> list[str]:
        """Checks that need the run's sizes: raise OptionError for what cannot run, return warnings for what
        runs but not as one might expect. `options` are the full resolved options."""
        return []

    @classmethod
    def state_bytes(cls, options: dict, ctx: EstimatorContext, world: int = 1) -> int:
        """Bytes *per rank* of state that grows with the data set (per-sample normalisers) in a run of `world`
        ranks, for the preflight's memory estimate; state of fixed size (NPN, lambda-nets) is small next to the
        model and not counted."""
        return 0

    def sharded_state(self) -> ShardedState | None:
        """The state_dict entries that are per-sample arrays, with this rank's share of them (world 1: the whole
        arrays, the same on every rank), or None without such state. They are checkpointed in files of their
        own, one per shard, that a resume reads memory-mapped (neuclip/train/resume.py)."""
        return None

    def __init__(self, cfg: dict, ctx: EstimatorContext):
        super().__init__()
        self.cfg = dict(cfg)
        self.ctx = ctx

    def forward(self, batch: Batch) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Encoder-block parameters this estimator owns (temperatures, SigLIP bias), as optimiser groups.

        Each group is a dict with "name", "params", "weight_decay" and "lr" (None = the trainer's lr). The
        trainer applies its lr schedule multiplier to each group's base lr.
        """
        return []

    def lr_factors(self) -> dict[str, float]:
        """Extra per-group lr multipliers decided by the method (e.g. FastCLIP's lr_tau / 3 below 0.03)."""
        return {}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Projection after the encoder step (clamping temperatures)."""

    def temperature(self) -> float:
        """The current global temperature tau (for logs and for the error study's exact normaliser)."""
        raise NotImplementedError

    @torch.no_grad()
    def log_normalizers(
        self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Current estimates (alpha1_hat, alpha2_hat) of log(eps + g_k) for these anchors, float32.

        Entries a method has no estimate for yet (a per-sample state never visited) are NaN.
        """
        raise NotImplementedError(f"{self.name} has estimate_kind={self.estimate_kind!r}")

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with per-epoch resets (AmorLIP's EMA re-initialisation)."""
