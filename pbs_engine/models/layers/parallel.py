"""Tensor parallelism (Megatron-style): which slice of each weight a rank holds, and the collectives that join the
slices (one all-reduce after each row-parallel projection and the vocab-parallel embedding, one all-gather of the
vocab-parallel logits). Size 1 is the single-device case: no slicing, no communication."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object = field(default=None, repr=False)  # a torch.distributed ProcessGroup (gloo or NCCL) when size > 1

    def split(self, total: int) -> slice:
        """This rank's even share of `total` rows (heads, features; `total` divisible by size)."""
        per = total // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def padded_split(self, total: int) -> tuple[slice, int]:
        """This rank's share of `total` rows padded up to a multiple of size (the vocabulary): (rows, per rank)."""
        per = -(-total // self.size)
        return slice(min(total, self.rank * per), min(total, (self.rank + 1) * per)), per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            options = dist.AllreduceOptions()
            options.reduceOp = dist.ReduceOp.MIN
            self.group.allreduce([x], options).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


def kv_head_split(tp: TensorParallel, num_kv_heads: int) -> slice:
    """The KV heads this rank holds: an even share, or (fewer KV heads than ranks) the one its query heads read,
    replicated across the ranks that share it."""
    if num_kv_heads >= tp.size:
        return tp.split(num_kv_heads)
    head = tp.rank * num_kv_heads // tp.size
    return slice(head, head + 1)
