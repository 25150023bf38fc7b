"""Exact log-normalisers over a whole data set by a streaming pass (docs/method.md §6.2).

    alpha1*_i = log(eps + 1/(n-1) sum_{j != i} exp((e1_i . e2_j - e1_i . e2_i) / tau))     (image anchors)
    alpha2*_i = log(eps + 1/(n-1) sum_{j != i} exp((e2_i . e1_j - e2_i . e1_i) / tau))     (text anchors)

Anchors are processed in blocks against column chunks of the other modality, so memory is
O(anchor_block x chunk), never n x n. Where no term can overflow (|s_ij - s_ii| / tau is bounded by the norms:
any tau above ~0.025 for unit vectors in float32) the terms exp((s_ij - s_ii) / tau) are summed directly;
otherwise a running log-sum-exp keeps everything finite (tau = 0.01, h up to 200). Each chunk's matmul runs in
the embeddings' dtype (the hot path); the running sum can be kept in float64 (`accumulate="float64"`).
"""

from __future__ import annotations

import math

import torch

from neuclip.estimators.ops import world

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
CPU_CHUNK, GPU_CHUNK = 2048, 8192  # default columns per step (see exact_log_normalizers)
PAIR_ELEMENTS = 1 << 22  # StreamingExact: (anchor, batch-mate) pairs gathered at a time x d


@torch.no_grad()
def exact_log_normalizers(
    image: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    eps: float,
    anchors: torch.Tensor | None = None,
    chunk: int | None = None,
    anchor_block: int = 1024,
    accumulate: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha1*, alpha2*) for `anchors` (indices into the n rows; default all), each (a,) in `accumulate`.

    `chunk` (columns per step) defaults to 2048 on CPU, where a 1024 x 2048 block of logits stays in cache
    (measured 1.3x faster than 8192: docs/benchmarks.md), and to 8192 on GPU (fewer, larger kernels; not yet
    measured there)."""
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(
            f"image and text embeddings must both be (n, d); got {tuple(image.shape)}, {tuple(text.shape)}"
        )
    n = image.shape[0]
    if n < 2:
        raise ValueError("the exact normaliser needs at least 2 samples")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {list(ACCUMULATE)}, got {accumulate!r}")
    acc = torch.promote_types(ACCUMULATE[accumulate], image.dtype)  # never narrower than the inputs
    if chunk is None:
        chunk = CPU_CHUNK if image.device.type == "cpu" else GPU_CHUNK
    if anchors is None:
        anchors = torch.arange(n, device=image.device)
    anchors = anchors.to(image.device)
    out1, out2 = [], []
    max_norm = {"image": float(image.norm(dim=1).max()), "text": float(text.norm(dim=1).max())}
    for start in range(0, anchors.numel(), anchor_block):
        idx = anchors[start : start + anchor_block]
        pos = (image[idx] * text[idx]).sum(1)
        for out, anchor, others, name in ((out1, image[idx], text, "text"), (out2, text[idx], image, "image")):
            # the largest |(s_ij - s_ii) / tau| possible here (Cauchy-Schwarz): when even a whole chunk of such
            # terms stays far from float overflow, the exponentials can be summed directly (no running max)
            bound = (float(anchor.norm(dim=1).max()) * max_norm[name] + float(pos.abs().max())) / tau
            direct = bound + math.log(min(chunk, n)) < 0.9 * math.log(torch.finfo(anchor.dtype).max)
            out.append((_block_direct if direct else _block)(anchor, others, idx, pos, tau, chunk, acc))
    log_eps = math.log(eps)
    a1, a2 = torch.cat(out1), torch.cat(out2)
    norm = math.log(n - 1)
    return (
        torch.logaddexp(a1 - norm, torch.full_like(a1, log_eps)),
        torch.logaddexp(a2 - norm, torch.full_like(a2, log_eps)),
    )


def _block(anchor, others, idx, pos, tau, chunk, acc) -> torch.Tensor:
    """log sum_{j != i} exp((anchor_i . others_j - pos_i) / tau) for one block of anchors.

    The 1/tau scale goes on the (a x d) anchors rather than the (a x chunk) logits, and pos_i / tau is
    subtracted once at the end (log-sum-exp is shift-equivariant): the hot loop is one matmul and one
    in-place log-sum-exp per chunk, with no extra passes over the logits.
    """
    scaled = anchor / tau
    running = torch.full((anchor.shape[0],), -math.inf, dtype=acc, device=anchor.device)
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    for c0 in range(0, others.shape[0], chunk):
        logits = scaled @ others[c0 : c0 + chunk].T
        own = (idx >= c0) & (idx < c0 + chunk)  # the positive pair j == i lies in this chunk
        if bool(own.any()):
            logits[rows[own], idx[own] - c0] = -math.inf
        running = torch.logaddexp(running, _logsumexp_(logits).to(acc))
    return running - (pos / tau).to(acc)


def _block_direct(anchor, others, idx, pos, tau, chunk, acc) -> torch.Tensor:
    """`_block`'s result where no exp((s_ij - s_ii) / tau) can overflow (the caller checks). The shift by the
    positive pair rides in the matmul as one extra column, [a_i / tau, -s_ii / tau] . [o_j, 1], so a chunk costs
    a matmul, an in-place exp and a sum: two passes over the logits instead of four (1.2x faster on CPU)."""
    scaled = torch.cat([anchor / tau, (-pos / tau).unsqueeze(1)], dim=1)
    total = torch.zeros(anchor.shape[0], dtype=acc, device=anchor.device)
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    for c0 in range(0, others.shape[0], chunk):
        part = others[c0 : c0 + chunk]
        logits = scaled @ torch.cat([part, part.new_ones(part.shape[0], 1)], dim=1).T
        own = (idx >= c0) & (idx < c0 + chunk)
        if bool(own.any()):
            logits[rows[own], idx[own] - c0] = -math.inf
        total += logits.exp_().sum(dim=1).to(acc)
    return total.log()


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp that overwrites `logits` (about 10 % faster on CPU than torch.logsumexp, which
    allocates two more a x chunk temporaries). A row that is all -inf gives -inf, not nan."""
    top = logits.amax(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


class StreamingExact:
    """The same alpha* for fixed anchors against rows that arrive in any order and on any rank (docs/method.md
    §6.2, distributed): each rank feeds its own rows to `add`, keeping only per-anchor running log-sums (and,
    for the mini-batch estimate, log-sums over each anchor's batch-mates); `result` combines the ranks'.

    Memory per rank: the anchors (A x d) and one chunk of rows with its A x chunk logits, never n x d. Rows are
    identified by their position 0..n-1 in the data set's order (ids sorted), so that the positive pair j == i
    is left out and the mini-batch partition is the one `estimates.minibatch_log_normalizers` draws. The
    per-chunk kernels are `_block`/`_block_direct` above, so every chunk's arithmetic is the one-process pass's.
    """

    def __init__(self, anchor_image, anchor_text, anchor_rows, n: int, tau: float, eps: float, *,
                 accumulate: str = "float64", anchor_block: int = 1024, batch_of=None, batch_size: int = 0):
        """`anchor_rows`: the anchors' positions. `batch_of` (optional, (n,) int64): each position's mini-batch
        in the partition, -1 outside a full batch; then `result` also gives log(eps + g_hat) per anchor in its
        batch of `batch_size`."""
        if n < 2:
            raise ValueError("the exact normaliser needs at least 2 samples")
        self.image, self.text = anchor_image, anchor_text
        self.rows = anchor_rows.to(anchor_image.device)
        self.n, self.tau, self.eps, self.block = n, tau, eps, anchor_block
        self.acc = torch.promote_types(ACCUMULATE[accumulate], anchor_image.dtype)
        self.pos = (anchor_image * anchor_text).sum(1)
        self.norms = anchor_image.norm(dim=1), anchor_text.norm(dim=1)
        a = anchor_rows.numel()
        self.sums = torch.full((2, a), -math.inf, dtype=self.acc, device=anchor_image.device)
        self.batch_of, self.batch_size = batch_of, batch_size
        if batch_of is not None:
            self.batch_of = batch_of.to(anchor_image.device)
            self.anchor_batch = self.batch_of[self.rows]
            self.mb = torch.full((2, a), -math.inf, dtype=torch.float64, device=anchor_image.device)
        self.seen = 0

    @torch.no_grad()
    def add(self, image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows at positions `rows` (c,) with embeddings `image`, `text` (c, d)."""
        if rows.numel() == 0:
            return
        rows = rows.to(image.device)
        self.seen += rows.numel()
        order = torch.argsort(rows)
        at = torch.searchsorted(rows[order], self.rows).clamp_max(rows.numel() - 1)
        own = torch.where(rows[order][at] == self.rows, order[at], -1)  # each anchor's own column, or -1
        chunk = min(CPU_CHUNK if image.device.type == "cpu" else GPU_CHUNK, rows.numel())
        limit = 0.9 * math.log(torch.finfo(image.dtype).max)
        for k, (anchor, others) in enumerate(((self.image, text), (self.text, image))):
            other_norm = float(others.norm(dim=1).max())
            for b0 in range(0, self.rows.numel(), self.block):
                sl = slice(b0, b0 + self.block)
                bound = (float(self.norms[k][sl].max()) * other_norm + float(self.pos[sl].abs().max())) / self.tau
                kernel = _block_direct if bound + math.log(chunk) < limit else _block
                part = kernel(anchor[sl], others, own[sl], self.pos[sl], self.tau, chunk, self.acc)
                self.sums[k, sl] = torch.logaddexp(self.sums[k, sl], part.to(self.acc))
        if self.batch_of is not None:
            self._add_batch_mates(image, text, rows)

    def _add_batch_mates(self, image, text, rows) -> None:
        """log-sums over j in the anchor's mini-batch, j != i: the few (anchor, row) pairs that share a batch,
        each a float64 dot product (the one-process estimate computes them in float32)."""
        row_batch = self.batch_of[rows]
        by_batch = torch.argsort(self.anchor_batch)
        sorted_batch = self.anchor_batch[by_batch]
        lo = torch.searchsorted(sorted_batch, row_batch)
        hi = torch.searchsorted(sorted_batch, row_batch, right=True)
        count = torch.where(row_batch >= 0, hi - lo, 0)
        if int(count.sum()) == 0:
            return
        col = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
        start = torch.repeat_interleave(lo, count)
        offset = torch.arange(col.numel(), device=rows.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
        anchor = by_batch[start + offset]
        keep = self.rows[anchor] != rows[col]  # not the positive pair
        anchor, col = anchor[keep], col[keep]
        # pairs in blocks: their rows are gathered, so a block costs block x d (there are about
        # chunk x anchors x B / n pairs in a chunk, which can exceed the chunk itself when n is small)
        block = max(1024, PAIR_ELEMENTS // image.shape[1])
        for k, (mine, others) in enumerate(((self.image, text), (self.text, image))):
            h = torch.empty(anchor.numel(), dtype=torch.float64, device=anchor.device)
            for p0 in range(0, anchor.numel(), block):
                a, c = anchor[p0 : p0 + block], col[p0 : p0 + block]
                h[p0 : p0 + block] = ((mine[a].double() * others[c].double()).sum(1) - self.pos[a].double()) / self.tau
            top = torch.full_like(self.mb[k], -math.inf).scatter_reduce(0, anchor, h, "amax")
            total = torch.zeros_like(self.mb[k]).index_add_(0, anchor, torch.exp(h - top[anchor]))
            self.mb[k] = torch.logaddexp(self.mb[k], top + total.log())

    @torch.no_grad()
    def result(self):
        """(alpha1*, alpha2*) in `accumulate`, and with `batch_of` also the mini-batch (est1, est2) in float32 (NaN
        for anchors outside a full batch). A collective under torch.distributed: every rank gets the same."""
        rank_sums, rank_mb = self.sums, self.mb if self.batch_of is not None else None
        _, size = world()
        seen = torch.tensor([self.seen], device=self.sums.device)
        if size > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(self.sums) for _ in range(size)]
            dist.all_gather(parts, self.sums)  # in rank order: the same combination on every rank
            rank_sums = torch.logsumexp(torch.stack(parts), dim=0)
            if rank_mb is not None:
                parts = [torch.empty_like(self.mb) for _ in range(size)]
                dist.all_gather(parts, self.mb)
                rank_mb = torch.logsumexp(torch.stack(parts), dim=0)
            dist.all_reduce(seen)
        if int(seen) != self.n:
            raise ValueError(f"the streamed rows number {int(seen)}, expected n = {self.n}")
        log_eps = math.log(self.eps)
        alpha = torch.logaddexp(rank_sums - math.log(self.n - 1), torch.full_like(rank_sums, log_eps))
        if rank_mb is None:
            return alpha[0], alpha[1]
        est = torch.logaddexp(rank_mb - math.log(self.batch_size - 1), torch.full_like(rank_mb, log_eps)).float()
        est[:, self.anchor_batch < 0] = math.nan
        return (alpha[0], alpha[1]), (est[0], est[1])
