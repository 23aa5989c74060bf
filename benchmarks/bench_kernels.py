"""`python benchmarks/bench_kernels.py [args]` = `pbs-engine bench kernels [args]`: dense prefill vs torch SDPA
(cuDNN, flash) and FlexAttention, PBS at fixed densities and threshold 0.9 vs FlexAttention block-sparse, paged
decode vs copy bandwidth. Needs a CUDA GPU."""
from __future__ import annotations

import sys

from pbs_engine.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
