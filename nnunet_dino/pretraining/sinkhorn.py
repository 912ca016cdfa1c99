"""Sinkhorn-Knopp centring of teacher outputs (DINOv2 / DINOv3), our own: lightly 1.6's DINOLoss and IBOTPatchLoss
centre only by a running mean (``center_mode="mean"`` is their only mode), which DINOv2 replaced by SK because it
balances prototype usage within each batch instead of lagging behind it.

``sinkhorn_knopp_log`` returns *log* targets. The losses consume them through lightly's DINOLoss / IBOTPatchLoss by
passing ``log_q * T`` as teacher logits with temperature T and a centre that stays at zero (momentum 1): their
softmax((log_q * T - 0) / T) is q exactly, so lightly's cross-entropy (with its view pairing and masking weights)
runs on the SK targets unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp_log(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Log of the SK-balanced assignment of N samples (rows of ``logits``, (N, K)) to K prototypes: every prototype
    gets 1/K of the mass and every sample 1/N, in the log domain (no overflow at small temperatures). With DDP the
    column sums and N are reduced over all processes, as in DINOv2. Rows of exp(result) sum to 1."""
    log_q = (logits.float() / temperature).t()  # (K, N)
    n = _all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
    k = log_q.shape[0]
    # Subtract the global max for stability (any constant cancels in the normalisations).
    m = _max_all(log_q.max().clone())
    log_q = log_q - m
    log_total = torch.logsumexp(log_q.flatten(), 0)
    total = _all_reduce(torch.exp(log_total).reshape(1))
    log_q = log_q - torch.log(total)
    for _ in range(iterations):
        rows = _all_reduce(torch.exp(torch.logsumexp(log_q, dim=1)))  # (K,) mass per prototype over all samples
        log_q = log_q - torch.log(rows).unsqueeze(1) - torch.log(torch.tensor(float(k), device=log_q.device))
        cols = torch.logsumexp(log_q, dim=0, keepdim=True)  # (1, N) mass per local sample
        log_q = log_q - cols - torch.log(n)
    log_q = log_q + torch.log(n)  # each sample's column now sums to 1
    return log_q.t()


def _max_all(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
