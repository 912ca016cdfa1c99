"""TokenBook: learnable prototypes compared with patch tokens, aggregated into guide masks at token resolution.

Two formulations:
- ``learned`` (default): per guide k (one per nnU-Net output channel: classes incl. background, or regions) a
  set of M prototypes; cosine similarities are aggregated by a temperature-scaled soft maximum (a token matches a
  class when it is close to *any* of its prototypes) and mapped to a logit by a learnable scale and offset. The
  mask is sigmoid(logit). Learns multi-modal classes; starts unsaturated (guides near 0.5, see ``forward``).
- ``paper`` (ablation of the published GuiDINO): one guide, N prototypes, mask = 0.5 * mean_j cos(t, p_j) + 0.5.
  The mean of cosines equals the cosine with the mean prototype, so the N prototypes collapse into one direction
  and the mask starts at ~0.5 with a tiny range (see docs/guidino.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenBookConfig:
    mode: str = "learned"  # "learned" | "paper"
    prototypes_per_guide: int = 16  # "paper": total prototypes
    projection_dim: int = 256
    temperature: float = 0.1  # soft-max sharpness over a guide's prototypes ("learned")

    def __post_init__(self):
        if self.mode not in ("learned", "paper"):
            raise ValueError(f"TokenBook mode must be 'learned' or 'paper', got {self.mode!r}.")


class TokenBook(nn.Module):
    def __init__(self, token_dim: int, num_guides: int, config: TokenBookConfig = TokenBookConfig()):
        super().__init__()
        self.config = config
        self.num_guides = 1 if config.mode == "paper" else num_guides
        self.projection = nn.Conv2d(token_dim, config.projection_dim, 1)
        self.prototypes = nn.Parameter(
            torch.randn(self.num_guides, config.prototypes_per_guide, config.projection_dim) * 0.02)
        if config.mode == "learned":
            self.logit_scale = nn.Parameter(torch.tensor(10.0))
            self.logit_bias = nn.Parameter(torch.zeros(self.num_guides))

    def similarities(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every token with every prototype: (B, K, M, h, w)."""
        t = F.normalize(self.projection(tokens), dim=1)
        p = F.normalize(self.prototypes, dim=-1)
        return torch.einsum("bchw,kmc->bkmhw", t, p)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, C, h, w) -> (guide logits or None-equivalent scores, guide masks in [0, 1]), both (B, K, h, w)."""
        s = self.similarities(tokens)
        if self.config.mode == "paper":
            score = s.mean(dim=2)
            return score, 0.5 * score + 0.5
        tau = self.config.temperature
        # Smooth max over the guide's prototypes, centred: tau * logsumexp over M near-orthogonal prototypes is
        # ~tau * ln M (0.28 for 16 at tau 0.1) before any training, which times logit_scale started every guide
        # saturated at ~0.95. Subtracting tau * ln M starts it near 0.5 with the full sigmoid range ahead.
        aggregated = tau * (torch.logsumexp(s / tau, dim=2) - math.log(s.shape[2]))
        logits = self.logit_scale * aggregated + self.logit_bias.view(1, -1, 1, 1)
        return logits, torch.sigmoid(logits)
