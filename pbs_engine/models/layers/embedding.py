"""Token embedding and the LM head (optionally tied to it), vocab-parallel under tensor parallelism: each rank
holds a slice of the vocabulary's rows (padded to equal slices)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pbs_engine.kernels import linear
from pbs_engine.models.layers.parallel import SINGLE, TensorParallel


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp, self.full_shape = tp, (vocab_size, hidden_size)
        self.rows, per_rank = tp.padded_split(vocab_size)
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size), requires_grad=False)

    def source_index(self) -> tuple[slice, ...]:
        return (self.rows,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.rows.start
        mine = (local >= 0) & (local < self.rows.stop - self.rows.start)
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(x)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp, self.vocab_size, self.full_shape = tp, vocab_size, (vocab_size, hidden_size)
        self.rows, per_rank = tp.padded_split(vocab_size)
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size), requires_grad=False)

    def source_index(self) -> tuple[slice, ...]:
        return (self.rows,)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary on every rank."""
        return self.tp.all_gather(linear(hidden, self.weight))[..., :self.vocab_size]
