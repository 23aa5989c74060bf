"""pbs-engine: long-context LLM inference with Permuted Block-Sparse Attention."""
from pbs_engine.engine.llm import LLM
from pbs_engine.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.kernels import PBSConfig

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "PBSConfig"]
__version__ = "0.1.0"
