"""Generic file I/O below every stage: HTTP downloads with resume, retries, checksums, a mirror and
a cache folder (download.py). Nothing here knows datasets, tokenizers or models; data/ and weights/
build on it. Import the submodule directly: `from scratchllm.io.download import download`.
"""
