"""Tests import the flat top-level modules (rewards, data, model, ...) from
the repo root, run in place."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, whatever the shell says (set before torch is first imported): tiny
# models are dominated by per-op overhead, so it is faster on the 2-core CI machine; the resume
# tests compare in-process runs with 1-thread subprocesses bit for bit (another thread count sums
# in another order); and the forked two-rank tests would otherwise inherit an OpenMP thread pool
# whose threads did not survive the fork (at OMP_NUM_THREADS=2 the suite hung there).
os.environ["OMP_NUM_THREADS"] = "1"


# Fixtures several test files share. Module-scoped, as each file had them: every file that asks
# builds its own (all are deterministic), and a file may define its own of the same name instead
# (test_decoding.py's tok, test_rollout_vllm.py's init_dir).


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A tiny random model + tokenizer (the tiny default's init/), built once per module."""
    import train
    out = tmp_path_factory.mktemp("init")
    args = train.get_args(["--out", str(out), "--frames", "2"])
    return train.tiny_init(args, rank=0)


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer of the model tests (test_model.CORPUS)."""
    import model as M
    from test_model import CORPUS
    return M.build_tiny_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def cfg(tok):
    # 4 x 4 patches of a 56 px frame: the shapes the model tests check
    import model as M
    return M.tiny_config(len(tok), patch_size=14)


@pytest.fixture(scope="module")
def frames():
    import numpy as np
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]
