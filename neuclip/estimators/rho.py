"""The rule that gives a data set without a published recipe its rho (docs/methods.md, "rho per data set").

rho is the weight of RGCL(-g)'s temperature penalty. At the optimum over tau of the objective as written,
d/dtau [tau log g(tau) + rho tau] = 0 gives rho = E_p[h] - log mean exp(h) = KL(p || uniform), p the softmax
of an anchor's negatives: its normaliser rests on about n_eff = n e^-rho effective negatives. The FastCLIP
group's CC3M recipe (rho 6.5 on 2.72M pairs at a global batch of 1024; docs/method.md §8) puts
n_eff = 2.72e6 e^-6.5 = 4088, four batches' worth. A data set without a recipe keeps that: n_eff = 4 B, i.e.

    rho = log(n / (4 B)) = 6.5 + log((n / B) / (n / B at CC3M))

which is 6.5 at CC3M by construction and 2.77 for the tiny set (n 4096, B 64). It is anchored on the one
recipe that the tiny and synthetic settings copy (CC3M's lr_tau and tau_init); the published rho of the larger
sets grow faster than it (CC12M 8.5 vs 7.0 by the rule), which is why those cells keep their scripts' values.
It is never negative: below n = 4 B it gives 0.
"""

from __future__ import annotations

import math

CC3M_RHO, CC3M_PAIRS, CC3M_BATCH = 6.5, 2_720_000, 1024


def rho_for(num_samples: int, global_batch: int) -> float:
    """rho of a data set of `num_samples` pairs trained at `global_batch`, by the CC3M-anchored rule above."""
    if num_samples < 1 or global_batch < 1:
        raise ValueError(f"rho_for: num_samples ({num_samples}) and global_batch ({global_batch}) must be >= 1")
    ratio = (num_samples / global_batch) / (CC3M_PAIRS / CC3M_BATCH)
    return max(0.0, CC3M_RHO + math.log(ratio))
