"""layerzip-pqkv: linear layers as product-quantized key-value tables with top-K retrieval."""

from .config import KVLinearConfig
from .method import PQKeyValue
from .module import OP, ApproxKVLinear, KVIndex, resolve_layout
from .quantize import adc_scores, pq_decode, pq_encode, train_pq

__all__ = ["OP", "ApproxKVLinear", "KVIndex", "KVLinearConfig", "PQKeyValue", "adc_scores",
           "pq_decode", "pq_encode", "resolve_layout", "train_pq"]
