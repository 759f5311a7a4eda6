"""Corpora -> token shards -> batches.

  sources.py   read text/JSONL/Parquet/folders/globs/builtin:pydocs/hf: inputs into cleaned documents
  registry.py  the datasets of `scratchllm data list|get` (pinned URLs, sizes, sha256)
  shards.py    `prepare` (parallel tokenization into train_/val_XXXX.bin + index.json), `open_shards`
  loaders.py   SlidingWindowDataset, RandomWindowSampler and SlidingWindowSampler (resumable,
               rank-sharded, counted in epochs), eval_batches
  labelled.py  labelled texts (TSV/CSV/JSONL/data:NAME) for classifiers: read, balance, split
  collate.py   padding with attention masks, the resumable shuffled ExampleBatches, in-order batches

Import from the submodules, e.g. `from scratchllm.data.shards import prepare, open_shards`.
"""
