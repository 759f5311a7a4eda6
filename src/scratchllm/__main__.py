"""`python -m scratchllm ...` (used by `torchrun -m scratchllm pretrain ...`)."""

import sys

from scratchllm.cli import main

sys.exit(main())
