"""Test setup: never touch the network; run the Triton kernels in the interpreter on CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Must be set before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the environment above)

from attnrules.toy import build_toy  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    """The planted model (attnrules.toy), built once per test module."""
    return build_toy()
