"""The optimiser of an estimator's own inner block (NeuCLIP's NPN, AmorLIP's lambda-nets).

Built lazily on first use, so it is created for the device the estimator was moved to (torch optimisers
allocate their state eagerly); kept in the module's extra state, so `state_dict()` covers it and a resume is
bit-exact. A state loaded before first use waits in `_pending_inner_state` until the optimiser exists.
"""

from __future__ import annotations

import torch


class InnerOptimizer:
    """Mixin for an nn.Module; subclasses implement `make_inner_optimizer()`."""

    _inner_opt: torch.optim.Optimizer | None = None
    _pending_inner_state: dict | None = None

    def make_inner_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def inner_optimizer(self) -> torch.optim.Optimizer:
        if self._inner_opt is None:
            self._inner_opt = self.make_inner_optimizer()
            if self._pending_inner_state is not None:
                self._inner_opt.load_state_dict(self._pending_inner_state)
                self._pending_inner_state = None
        return self._inner_opt

    def reset_inner_optimizer(self) -> None:
        self._inner_opt, self._pending_inner_state = None, None

    def get_extra_state(self) -> dict:
        opt = self._inner_opt
        return {"inner_optimizer": opt.state_dict() if opt is not None else self._pending_inner_state}

    def set_extra_state(self, state: dict) -> None:
        self._inner_opt, self._pending_inner_state = None, state["inner_optimizer"]
