"""Shared test set-up: offline hub, repo root importable, a small fixed thread count, the slow marker."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# CI's 2 cores, unless told otherwise. Under pytest-xdist (make test runs 2 workers) every process gets one thread:
# two processes spinning 2 threads each on 2 cores slow each other down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # and every script the tests launch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slowest end-to-end runs (skip locally with -m 'not slow'; CI runs them)")
