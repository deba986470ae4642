"""Tests import the flat top-level modules (rewards, data, model, ...) from
the repo root, run in place."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, whatever the shell says (set before torch is first imported): tiny
# models are dominated by per-op overhead, so it is faster on the 2-core CI machine; the resume
# tests compare in-process runs with 1-thread subprocesses bit for bit (another thread count sums
# in another order); and the forked two-rank tests would otherwise inherit an OpenMP thread pool
# whose threads did not survive the fork (at OMP_NUM_THREADS=2 the suite hung there).
os.environ["OMP_NUM_THREADS"] = "1"
