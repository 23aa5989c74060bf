"""CUDA graphs for decode steps: one graph per padded batch size, replayed with the batch copied into static inputs.

Padding rows write their K/V into a scratch cache block that no sequence owns, and attend to it alone.
"""
from __future__ import annotations

import torch

from pbs_engine.models.layers.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int, block_size: int,
                 device: torch.device):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slots[:bs], block_tables=self.tables[:bs],
                                 context_lens=self.lens[:bs])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.model(self.ids[:bs], self.positions[:bs], meta)  # warm up: compile kernels, size workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.ids[:bs], self.positions[:bs], meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; returns hidden states (B, hidden)."""
        n = ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        graph, out = self.graphs[bs]
        self.ids[:n] = ids
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:bs] = self.scratch_slot
        width = meta.block_tables.shape[1]
        self.tables[:n, :width] = meta.block_tables
        self.tables[n:bs] = self.scratch_block
        self.lens[:n] = meta.context_lens
        self.lens[n:bs] = 1
        graph.replay()
        return out[:n]
