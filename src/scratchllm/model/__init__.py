"""The model: ModelConfig (sizes + presets), GPT (the network, math only) and KVCache (decoding state).

    from scratchllm.model import GPT, KVCache, ModelConfig
    model = GPT(ModelConfig.from_preset("tiny"))
"""

from scratchllm.model.config import PRESETS, ModelConfig
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS"]
