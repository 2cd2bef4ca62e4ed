"""The `datasets` stand-in that bench/gpu_check.sh uses on the GPU machine: transformer_lens imports and
runs a model with it in place of the real package, and any use of the stand-in raises."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
import datasets
assert datasets.__file__.startswith(sys.argv[1]), datasets.__file__
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="gelu")
logits = HookedTransformer(cfg)(torch.tensor([[1, 2, 3]]))
assert logits.shape == (1, 3, 10)
for use in (lambda: datasets.load_dataset("x"), lambda: datasets.Dataset()):
    try:
        use()
    except ImportError as e:
        assert "stand-in" in str(e)
    else:
        raise AssertionError("the stand-in did not raise")
print("ok")
"""


def test_transformer_lens_runs_on_the_datasets_standin():
    standins = ROOT / "bench" / "standins"
    env = {**os.environ, "PYTHONPATH": str(standins), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(standins)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
