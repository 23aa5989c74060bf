"""Sampling on the device: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Random draws use the exponential race (argmax of p / E, E ~ Exp(1)), which samples from p without a host sync;
seeded requests draw their E from their own generator, so their output does not depend on the batch.
"""
from __future__ import annotations

import torch

from pbs_engine.engine.outputs import Logprob, PositionLogprobs
from pbs_engine.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.request_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.request_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits (B, V) float32 for the next token of each sequence -> sampled ids (B,) on the device."""
        logits = self._penalise(logits, seqs)
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=logits.device)
        logits = logits / temps[:, None]
        logits = self._truncate(logits, params)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seq in enumerate(seqs):
            gen = self._generator(seq)
            if gen is not None:
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _penalise(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        if all(p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0 and
               len(s.output_ids) >= p.min_tokens for p, s in zip(params, seqs)):
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i, seq in enumerate(seqs):
            p = seq.params
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device)
            if p.repetition_penalty != 1:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and out.numel():
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if len(seq.output_ids) < p.min_tokens and seq.stop_ids:
                logits[i, list(seq.stop_ids)] = float("-inf")
        return logits

    @staticmethod
    def _truncate(logits: torch.Tensor, params) -> torch.Tensor:
        """Mask tokens outside top-k, outside the top-p nucleus, or below min_p x the top probability."""
        if all(p.top_k == 0 and p.top_p >= 1 and p.min_p == 0 for p in params):
            return logits
        vocab = logits.shape[-1]
        dev = logits.device
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=logits.dtype)
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=logits.dtype)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop |= before > top_p[:, None]
        drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
        drop[:, 0] = False
        return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[PositionLogprobs]:
    """logprobs (N, V) log-softmaxed, chosen (N,) -> per row {token: Logprob} with the chosen token and top-k
    (their text is decoded by the output processor)."""
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    rows = []
    for c, lp, r, ids, lps in zip(chosen.tolist(), chosen_lp.tolist(), ranks.tolist(), top_ids.tolist(),
                                  top_lp.tolist()):
        row = {c: Logprob(lp, r)}
        for rank, (t, v) in enumerate(zip(ids, lps), start=1):
            row.setdefault(t, Logprob(v, rank))
        rows.append(row)
    return rows
