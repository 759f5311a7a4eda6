"""Training: one `Trainer` (core.py) that every stage runs on, the optimizer and schedules (optim.py),
the losses (objectives.py) and one `run(args)` per stage (pretrain.py, ...).

Import the pieces from their modules: `from scratchllm.train.core import Trainer`.
"""
