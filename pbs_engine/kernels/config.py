"""PBS-Attn settings: block and segment sizes, the selection threshold, and an optional block budget."""
from __future__ import annotations

from dataclasses import dataclass, replace

BLOCK_SCORES = ("mean", "lse")
QUERY_POOLS = ("mean", "last")
REP_COMBINES = ("union", "mean")


# one line per field for the CLI's --pbs-* flags (pbs_engine/cli/common.py generates them from the fields)
HELP = {
    "block_size": "tokens per query block and per key block",
    "segment_size": "keys are permuted inside segments of this many tokens (a multiple of block size)",
    "threshold": "keep the fewest key blocks whose share of the block-score mass reaches this",
    "permute": "sort keys inside segments by the last query block's attention before selecting (docs/eval.md)",
    "budget": "fixed density instead of the threshold: keep this fraction of the visible key blocks",
    "dense_last_blocks": "the last this many query blocks of each prefill call attend to every key block",
    "block_score": "score a block by mean-pooled keys (mean) or by the pooled query's attention mass in it (lse)",
    "query_reps": "pooled queries per query block; a key block is kept if any of them selects it",
    "query_pool": "each group's representative query: the mean of its queries (mean) or its last query (last)",
    "rep_combine": "threshold mode: keep the union of the pooled queries' choices (union), or one choice from "
                   "their mean block probabilities (mean)",
    "local_blocks": "the this many key blocks just before each query block's diagonal segment are always kept",
    "min_length": "prefill calls whose context (cached prefix + chunk) is shorter than this many tokens run dense "
                  "attention (default: measured per device, docs/prefill.md)",
}

# Below this context length PBS costs more than it saves on a GPU, so prefill runs dense (PBSConfig.min_length=None).
# H200, Qwen2.5-Coder-0.5B (real) and the Qwen2.5-7B-1M shape: see docs/prefill.md, `pbs-engine bench prefill`.
CUDA_DENSE_BELOW = 16384


@dataclass(frozen=True)
class PBSConfig:
    block_size: int = 128  # tokens per query block and per key block
    segment_size: int = 256  # keys are permuted inside segments of this many tokens (a multiple of block_size)
    threshold: float = 0.65  # keep the fewest key blocks whose share of the block-score mass outside the diagonal
    # segment reaches this (the paper's rule: the diagonal segment is always kept and takes no part in the softmax);
    # 0.65 with dense_last_blocks=2 on RULER at 32K (Qwen2.5-Coder-0.5B, H200): 47.9 vs dense 48.9 at density 0.28,
    # where 0.7 with one dense block scored 46.4 at 0.29 (docs/eval.md)
    permute: bool = False  # sort keys inside segments by the last query block's attention (the paper's permutation;
    # one per KV head, from its query heads' pooled attention);
    # off by default: on Qwen2.5-Coder-0.5B at 32K it raised NLL (+0.65% vs -1.15%, density 0.172 vs 0.193,
    # docs/eval.md): the sorted blocks lose the local coherence that makes a pooled block a good summary
    budget: float | None = None  # fixed density: keep this fraction of the visible key blocks (forced ones count)
    dense_last_blocks: int = 2  # the last this many query blocks of each prefill call attend to every key block:
    # in the prompt's final chunk they hold the question and the position that predicts the first output token
    # (decoding after it is dense), so a retrieval's answer starts from exact attention. Two, because the last
    # block of a prompt is mostly partial (a few tokens): with one, most of a RULER question (~100 tokens) was
    # sparse, and niah_multikey_2/3 lost 4 points each at 32K; with two they match dense. Each block costs
    # 1 / (query blocks) of dense
    block_score: str = "lse"  # how a (query block, key block) pair is scored: "mean" = mean-pooled query against
    # mean-pooled keys (the paper's MeanPooling); "lse" = log-sum-exp over the block's keys of the mean-pooled
    # query's scores, i.e. the exact share of that query's attention falling in the block (one key can carry it);
    # with "lse" the threshold counts mass over the candidate blocks only: the first block holds the attention sink,
    # whose true mass would reach the threshold almost alone
    query_reps: int = 4  # pooled queries per query block: its queries are mean-pooled in this many consecutive
    # groups, each scored on its own; a key block is kept when any group's threshold selection keeps it (budget
    # mode ranks blocks by their largest share over the groups). One mean per 128 queries averages away the
    # queries that look far back for one thing (copying, retrieval); 1 = the paper's one mean per block
    query_pool: str = "mean"  # a pooled query is the mean of its group of block_size / query_reps queries ("mean");
    # "last": the group's last query, a real query with a real query's sharpness (a mean of 32 rotated queries is
    # shorter, so its softmax over blocks is flatter than any of theirs)
    rep_combine: str = "union"  # threshold mode: a key block is kept when any pooled query's choice keeps it
    # ("union"); "mean": one choice from the pooled queries' mean block probabilities, an estimate of the block's
    # average attention mass over its queries
    local_blocks: int = 0  # always keep the this many key blocks just before the diagonal segment (a sliding
    # window that reaches back past the segment start: a query at a segment's start otherwise sees only itself)
    min_length: int | None = None  # a prefill call whose context is shorter runs dense; None: CUDA_DENSE_BELOW on
    # a GPU (measured there: below it selection and launch costs exceed what sparsity saves), 0 on the CPU

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0, "block_size",
             "must be a power of two >= 16"),
            (self.segment_size >= self.block_size and self.segment_size % self.block_size == 0, "segment_size",
             "must be a multiple of block_size"),
            (0 < self.threshold <= 1, "threshold", "must be in (0, 1]"),
            (self.budget is None or 0 < self.budget <= 1, "budget", "must be in (0, 1]"),
            (self.dense_last_blocks >= 0, "dense_last_blocks", "must be >= 0"),
            (self.query_reps >= 1 and self.block_size % self.query_reps == 0, "query_reps",
             "must be >= 1 and divide block_size"),
            (self.block_score in BLOCK_SCORES, "block_score", f"must be one of {', '.join(BLOCK_SCORES)}"),
            (self.query_pool in QUERY_POOLS, "query_pool", f"must be one of {', '.join(QUERY_POOLS)}"),
            (self.rep_combine in REP_COMBINES, "rep_combine", f"must be one of {', '.join(REP_COMBINES)}"),
            (self.local_blocks >= 0, "local_blocks", "must be >= 0"),
            (self.min_length is None or self.min_length >= 0, "min_length", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"PBSConfig.{name}={getattr(self, name)!r}: {why}")

    def dense_below(self, device) -> int:
        """The context length under which a prefill call on `device` (a torch.device) runs dense."""
        if self.min_length is not None:
            return self.min_length
        return CUDA_DENSE_BELOW if device.type == "cuda" else 0

    @classmethod
    def budget_of(cls, fraction: float, base: "PBSConfig | None" = None) -> "PBSConfig":
        """Budget mode at `fraction` of the visible key blocks, other settings from `base`."""
        return replace(base or cls(), budget=fraction)
