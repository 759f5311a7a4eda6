"""Weights in and out: our model folders, Hugging Face folders, llama.cpp's GGUF files, model names.

The modules (nothing is imported here: import the submodules directly):
- folder.py: writing our model folders (save_model / write_model_files, the file names).
- checkpoint.py: reading them: open_model / load_model of anything `--model` accepts.
- state.py: the state-dict rules every reader and writer shares (wrapper prefixes, tied weights,
  checked loading, the sha256 table of a checkpoint's meta.json).
- hf.py: Hugging Face folders in and out (GPT-2; tokenizer.json, chat templates, export_hf).
- hf_llama.py: the Llama-family side of hf.py (Llama / SmolLM2, Mistral, Qwen2 configs and key maps).
- gguf.py: GGUF files into our GPT: config from the metadata, tensor plan, load_gguf (+ tokenizer, chat).
- gguf_file.py: the GGUF file format itself: read_gguf and the dequantizers.
- registry.py: model names (`smollm2-135m-instruct`), .gguf imports into the cache, hub downloads.
- download.py: GPT-2's files on the hub (which files, their checksums).
- commands.py: the CLI side: `model info`, `model list`, `download`, `export`.
What it does not do: the model math (scratchllm.model) or tokenization (scratchllm.tokenizer).

    from scratchllm.weights.checkpoint import load_model
    model, tokenizer = load_model("smollm2-135m-instruct")
"""
