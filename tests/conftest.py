"""Tests import the flat top-level modules (rewards, data, model, ...) from
the repo root, run in place."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are dominated by per-op overhead: one thread per process is faster and
# steadier on the 2-core CI machine, and the torchrun tests start two processes. (Set
# before torch is first imported.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
