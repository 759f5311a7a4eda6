"""Evaluation: classification metrics; later perplexity, multiple-choice and LLM-as-judge.

  classification.py  confusion matrix, accuracy / per-class P-R-F1 / macro F1, text tables, a
                     confusion PNG and the most confident errors

Import from the submodules, e.g. `from scratchllm.eval.classification import classification_metrics`.
"""
