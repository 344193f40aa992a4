"""specdec: speculative decoding that generates exactly what the target model would, faster."""

from specdec.cache import KVCache
from specdec.engine import Engine, RequestParams
from specdec.speculative import GenerateOutput, generate
from specdec.proposers import DraftModelProposer, NGramProposer, Proposer
from specdec.sampling import SamplingConfig
from specdec.stats import SpecStats
from specdec import kernels, models  # noqa: E402  (the top-level folders kernels/, models/: namespace packages)
from specdec.models.loading import load
from specdec.models.quantized import quantize


__all__ = ["Engine", "GenerateOutput", "DraftModelProposer", "NGramProposer", "KVCache", "Proposer", "RequestParams",
           "SamplingConfig", "SpecStats", "generate", "kernels", "load", "models",
           "quantize"]
