import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# architecture descriptions cached by this session only (never the user's ~/.cache), child processes included;
# removed when the session ends (each run used to leave one directory behind in the temp dir)
if "K2QUANT_ARCH_CACHE" not in os.environ:
    os.environ["K2QUANT_ARCH_CACHE"] = tempfile.mkdtemp(prefix="k2quant-cache-")
    atexit.register(shutil.rmtree, os.environ["K2QUANT_ARCH_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread: two threads on a shared 2-core CI box were measured up to 100x slower
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny K2 checkpoints in all three formats, built once per session (read-only for tests)."""
    from k2quant.formats import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {fmt: tiny.build(root / fmt, fmt, seed=0) for fmt in ("bf16", "fp8", "int4")}
