"""Weights in and out: downloads (download.py), checkpoints and Hugging Face conversion.

Import the submodules directly, e.g. `from scratchllm.weights.download import download`.
"""
