"""Weights in and out: model folders (checkpoint.py), the state-dict rules they share with training
(state.py), Hugging Face conversion (hf.py) and GPT-2's files on the hub (download.py).

Import the submodules directly, e.g. `from scratchllm.weights.download import download_gpt2`.
"""
