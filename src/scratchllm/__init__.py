"""scratchllm: build a GPT-style language model from scratch and take it through every stage.

The public names are imported lazily, so `import scratchllm` (and the CLI's `--help`) stays fast and
does not import torch until a model-side name is used:

    >>> from scratchllm import Tokenizer, train_bpe
    >>> tok = train_bpe(["aaabdaaabac"], vocab_size=259)
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "Tokenizer": "scratchllm.tokenizer.tokenizer",
    "train_bpe": "scratchllm.tokenizer.bpe",
    "ScratchError": "scratchllm.common",
    "iter_documents": "scratchllm.data.sources",
    "prepare": "scratchllm.data.shards",
    "open_shards": "scratchllm.data.shards",
    "SlidingWindowDataset": "scratchllm.data.loaders",
    "RandomWindowSampler": "scratchllm.data.loaders",
    "SlidingWindowSampler": "scratchllm.data.loaders",
    "eval_batches": "scratchllm.data.loaders",
    "download": "scratchllm.io.download",
    "ModelConfig": "scratchllm.model.config",
    "GPT": "scratchllm.model.gpt",
    "KVCache": "scratchllm.model.kv_cache",
    "load_hf_gpt2": "scratchllm.weights.hf",
    "export_hf": "scratchllm.weights.hf",
    "save_model": "scratchllm.weights.checkpoint",
    "load_model": "scratchllm.weights.checkpoint",
    "Engine": "scratchllm.infer.engine",
    "Trainer": "scratchllm.train.core",
    "TrainConfig": "scratchllm.configs",
    "PretrainConfig": "scratchllm.configs",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'scratchllm' has no attribute {name!r}")


def __dir__():
    return __all__
