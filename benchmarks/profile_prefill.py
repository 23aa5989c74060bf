"""Where a long PBS prefill at a 10% block budget spends its GPU time: torch.profiler table of one warm prefill
in the Qwen2.5-7B-1M shape with random weights. Run on a GPU: PYTHONPATH=. python benchmarks/profile_prefill.py
[tokens, default 131072] [query_reps, default 4] (docs/results/h100/profile-prefill-128k.json)."""
import sys

from torch.profiler import ProfilerActivity, profile

from pbs_engine import LLM, PBSConfig, SamplingParams
from pbs_engine.bench.runtime import _model_source, _random_ids

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
path, fmt, cfg = _model_source("random:qwen2.5-7b-1m")
llm = LLM(path, load_format=fmt, skip_tokenizer_init=True, max_model_len=n + 16, max_num_batched_tokens=16384,
          max_num_seqs=8, enable_prefix_caching=False, pbs=PBSConfig.budget_of(0.10, PBSConfig(query_reps=reps)))
params = SamplingParams(max_tokens=1, ignore_eos=True)
ids = _random_ids(n, cfg["vocab_size"], n)
llm.generate({"prompt_token_ids": ids}, params)  # compiles every kernel shape this length needs
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    out = llm.generate({"prompt_token_ids": ids}, params)[0]
print("ttft profiled", out.metrics.first_token_time - out.metrics.first_scheduled_time, flush=True)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
