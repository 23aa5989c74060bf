"""Llama (Llama-3.1, SmolLM2) decoder: the architecture wired from shared layers, plus its checkpoint-name mapping."""
from __future__ import annotations

import torch
from torch import nn

from pbs_engine.models.config import ModelConfig
from pbs_engine.models.layers.activation import SiluAndMul
from pbs_engine.models.layers.attention import Attention, AttentionMetadata
from pbs_engine.models.layers.embedding import LMHead, VocabEmbedding
from pbs_engine.models.layers.linear import Linear
from pbs_engine.models.layers.norm import RMSNorm
from pbs_engine.models.layers.parallel import SINGLE, TensorParallel, kv_head_split
from pbs_engine.models.layers.rotary import RotaryEmbedding


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, tp: TensorParallel):
        super().__init__()
        d = cfg.head_dim
        q_heads, kv_heads = tp.split(cfg.num_attention_heads), kv_head_split(tp, cfg.num_key_value_heads)
        self.num_heads, self.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        rows = lambda heads: slice(heads.start * d, heads.stop * d)  # noqa: E731
        self.qkv_proj = Linear(cfg.hidden_size, [cfg.num_attention_heads * d] + [cfg.num_key_value_heads * d] * 2,
                               bias=cfg.attention_bias, sources=[rows(q_heads), rows(kv_heads), rows(kv_heads)], tp=tp)
        self.o_proj = Linear(cfg.num_attention_heads * d, [cfg.hidden_size], in_source=rows(q_heads), tp=tp)
        self.rotary = rotary
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k, v, stored = self.attn.rotate_and_store(self.rotary, positions, q, k, v, meta)
        o = self.attn(q, k, v, meta, stored=stored)
        return self.o_proj(o.reshape(-1, self.q_size))


CPU_MLP_ROWS = 1024  # tokens per MLP pass on CPU: the (rows, 2 x intermediate) activations stay in cache
# (SmolLM2-135M, 4K tokens, 2 threads: 132 ms per layer against 157 ms in one pass)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel):
        super().__init__()
        mine = tp.split(intermediate)
        self.gate_up_proj = Linear(hidden, [intermediate, intermediate], sources=[mine, mine], tp=tp)
        self.down_proj = Linear(intermediate, [hidden], in_source=mine, tp=tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x, or (e4m3 rows, per-token scales) from a quantising RMSNorm (FP8)."""
        rows = x[0] if isinstance(x, tuple) else x
        if rows.is_cuda or len(rows) <= CPU_MLP_ROWS:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        parts = [self.forward(tuple(t[r:r + CPU_MLP_ROWS] for t in x) if isinstance(x, tuple) else
                              x[r:r + CPU_MLP_ROWS]) for r in range(0, len(rows), CPU_MLP_ROWS)]
        return torch.cat(parts)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, tp: TensorParallel):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, layer_idx, rotary, tp)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, tp: TensorParallel):
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (our merged module, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # checkpoint tensors that carry nothing we need (an FP8 checkpoint's static activation and KV scales: inputs
    # are quantised per token as they come)
    ignored_suffixes = ("rotary_emb.inv_freq", ".input_scale", ".k_scale", ".v_scale", ".kv_scale")

    def __init__(self, cfg: ModelConfig, max_position: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_position, tp)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) over the packed batch -> hidden states (T, hidden)."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def quantize_fp8(self, from_checkpoint: bool = False) -> None:
        """FP8 (W8A8) decoder layers: every projection's weight to e4m3 with per-channel scales (from_checkpoint:
        empty e4m3 weights and scales, for an FP8 checkpoint's tensors), and the RMSNorms and SiLU-and-mul before
        them emit e4m3 rows with per-token scales (the attention output is quantised by o_proj itself). Embeddings
        and the LM head stay in the model's dtype."""
        for layer in self.model.layers:
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
                linear.prepare_fp8_checkpoint() if from_checkpoint else linear.quantize_fp8()
            layer.input_layernorm.quantize_output = True
            layer.post_attention_layernorm.quantize_output = True
            layer.mlp.act.quantize_output = True

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
