"""A stand-in for Hugging Face ``datasets`` on the lent GPU machine, for ``bench/bench_pipeline.py`` only.

transformer_lens imports ``datasets`` when it is imported (for type hints and its dataset helpers), and
``datasets`` needs pyarrow, whose wheel alone (≈ 53 MiB) does not fit in the 64 MiB that travel to the
GPU machine. The pipeline benchmark never loads a dataset (its corpus is random tokens), so
``bench/gpu_check.sh`` puts this folder on ``PYTHONPATH`` for that step when the real package does not
import there. Every entry point raises, so nothing can silently run on it.
"""
import sys


class _Unavailable:
    """Any use says that this is the stand-in."""

    def __init__(self, *args, **kwargs):
        raise ImportError("the datasets stand-in of bench/standins cannot load data; install `datasets`")


class Dataset(_Unavailable):
    pass


class DatasetDict(_Unavailable):
    pass


class IterableDataset(_Unavailable):
    pass


class IterableDatasetDict(_Unavailable):
    pass


def load_dataset(*args, **kwargs):
    raise ImportError("the datasets stand-in of bench/standins cannot load data; install `datasets`")


# transformer_lens and sae_lens import these names from submodules as well: the same objects.
for _name in ("arrow_dataset", "iterable_dataset", "load", "dataset_dict"):
    sys.modules[f"{__name__}.{_name}"] = sys.modules[__name__]
