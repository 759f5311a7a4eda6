"""Generation: sampling (sampling.py), incremental detokenization (detok.py) and the engine (engine.py);
a trained classifier loaded back for predictions (classifier.py).

    from scratchllm.infer import Engine
    engine = Engine(model, tokenizer)
    ids = list(engine.generate(tokenizer.encode("Hello"), max_new_tokens=20, temperature=0))
"""

from scratchllm.infer.engine import Engine

__all__ = ["Engine"]
