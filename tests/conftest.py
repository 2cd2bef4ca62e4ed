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


@pytest.fixture
def shared_pass_sequences(monkeypatch):
    """The sequences each full pass of the shared exemplar pass (``pipeline.activations.run_batches`` through
    blocks 0..L, not from a kept ``hook_resid_pre``) runs over, appended while the test runs."""
    import attnrules.pipeline.activations as activations

    sizes, real = [], activations.run_batches

    def counted(model, tokens, *args, **kwargs):
        if kwargs.get("resid") is None:
            sizes.append(tokens.shape[0])
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(activations, "run_batches", counted)
    return sizes
