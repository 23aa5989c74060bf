"""RULER-style retrieval: a pass key (and distractor keys) hidden at a depth of a long real document."""
from __future__ import annotations

from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.eval.text import passkey_prompt


def needle_accuracy(llm, haystack_ids: list[int], methods: dict, lengths: list[int], depths: list[float],
                    seeds: int = 2, num_keys: tuple[int, ...] = (1, 4)) -> list[dict]:
    """Greedy answers for every (method, length, depth, keys, seed); a hit when the key appears in the answer."""
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=12, temperature=0)
    cases = [(n, d, k, s) for n in lengths for d in depths for k in num_keys for s in range(seeds)]
    prompts = [passkey_prompt(haystack_ids, tok, n, d, seed=1000 * k + s, num_keys=k) for n, d, k, s in cases]
    rows = []
    for name, (attention, pbs) in methods.items():
        llm.set_prefill_attention(attention, pbs)
        outs = llm.chat([[{"role": "user", "content": p}] for p, _ in prompts], params)
        for (n, d, k, s), (_, answer), out in zip(cases, prompts, outs):
            rows.append({"method": name, "tokens": n, "depth": d, "keys": k, "seed": s,
                         "correct": answer in out.text, "answer": out.text.strip()[:40]})
    return rows
