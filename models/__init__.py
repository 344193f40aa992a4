"""Native model implementations and loaders (installed as ``specdec.models``)."""

from specdec.models.head import DraftHead
from specdec.models.llama import LlamaModel
from specdec.models.loading import REGISTRY, as_native, load, register

__all__ = ["DraftHead", "LlamaModel", "REGISTRY", "as_native", "load", "register"]
