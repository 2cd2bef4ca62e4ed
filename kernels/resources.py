"""Registers and spills of the streaming kernel, compiled for a GPU architecture without a GPU.

Triton compiles for any target it is given (``GPUTarget("cuda", 90, 32)``: an H100/H200; 80: an
A100); the PTX is then assembled by the ``ptxas`` that ships with Triton, whose ``-v`` report gives
the registers per thread and the spill stores/loads. Used by ``tests/test_triton_compile.py`` (no
spills at the default configurations) and by ``bench/gpu_check.sh``'s report; run as
``python -m attnrules.kernels.resources [--arch 90 80]`` it prints one JSON line per case and architecture.
Must be imported without ``TRITON_INTERPRET=1`` (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import plan as plan_module
from . import topk_stream
from .dual_topk import dual_tile
from .pair_topk import pair_tile


@dataclass(frozen=True)
class Case:
    """One kernel configuration as the engine plans it for a benchmark case (GPT-2 small shapes)."""

    name: str
    dual: bool
    global_mode: bool
    k: int
    d: int = 64
    n_x: Optional[int] = None
    score: str = "signed"
    precision: str = plan_module.DEFAULT_PRECISION


# The benchmark's cases (bench/bench_triton.py) at the default precision, plus fp32 only.
CASES = (
    Case("pair global k=10000", dual=False, global_mode=True, k=10_000),
    Case("pair per-row k=100", dual=False, global_mode=False, k=100),
    Case("dual global k=10000 (100 exemplars)", dual=True, global_mode=True, k=10_000, n_x=100),
    Case("pair global k=10000 ieee", dual=False, global_mode=True, k=10_000, precision="ieee"),
)

_TYPES = {"a_ptr": "*fp32", "b_ptr": "*fp32", "xa_ptr": "*fp32", "xb_ptr": "*fp32", "na_ptr": "*fp32",
          "nb_ptr": "*fp32", "buf_ptr": "*i64", "count_ptr": "*i32", "thr_ptr": "*i64",
          "margin_c": "fp32", "floor": "fp32"}  # fmt: skip


def constexprs(case: Case, block_c: int) -> dict:
    """The kernel's constexpr arguments for ``case`` as ``launch.launch`` sets them (on a GPU)."""
    p = plan_module.plan(n_rows=24576, n_cols=24576, d=case.d, n_x=case.n_x, k=case.k, global_mode=case.global_mode,
                         precision=case.precision, block_c=block_c, n_splits=2)  # fmt: skip
    return {
        "TILE": dual_tile if case.dual else pair_tile, "DUAL": case.dual,
        "SCORE": topk_stream.SCORE_CODES[case.score], "HAS_XA": case.dual, "HAS_XB": True,
        "GLOBAL": p.global_mode, "K": p.k_program, "CAP": p.cap, "CHUNK": p.chunk,
        "FILTER": p.precision, "RESCORE": p.rescore, "EMULATE": False, "STATIONARY": p.stationary,
        "BLOCK_R": p.block_r, "BLOCK_C": block_c, "BLOCK_D": p.block_d, "BLOCK_X": p.block_x,
    }


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill stores/loads (bytes) and shared memory of ``ptx`` assembled for sm_``arch``."""
    ptxas = triton.knobs.nvidia.ptxas.path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "kernel.o")],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}: {done.stderr.strip()[-2000:]}")
    log = done.stderr + done.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-2000:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def compile_case(case: Case, arch: int, block_c: Optional[int] = None,
                 num_warps: int = topk_stream.DEFAULT_WARPS, num_stages: int = topk_stream.DEFAULT_STAGES) -> dict:
    """Compile ``case`` for sm_``arch`` (default: the plan's configuration); its resource use."""
    block_c = block_c or plan_module.default_block_c(case.global_mode, case.n_x)
    fn = topk_stream.stream_topk_kernel
    const = constexprs(case, block_c)
    signature = {name: ("constexpr" if name in const else _TYPES.get(name, "i32")) for name in fn.arg_names}
    src = ASTSource(fn, signature, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    report = ptxas_report(compiled.asm["ptx"], arch)
    shared = compiled.metadata.shared if hasattr(compiled.metadata, "shared") else None
    return dict(asdict(case), arch=arch, block_c=block_c, num_warps=num_warps, num_stages=num_stages,
                block_r=const["BLOCK_R"], shared_bytes=shared, triton=triton.__version__, **report)  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100/H200)")
    parser.add_argument("--cases", nargs="+", type=int, default=None, help="indices into CASES (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="compiles run in parallel")
    args = parser.parse_args(argv)
    if topk_stream.INTERPRETED:
        print("resources: TRITON_INTERPRET=1 is set; unset it to compile", file=sys.stderr)
        return 2
    cases = CASES if args.cases is None else [CASES[i] for i in args.cases]
    jobs = [(case, arch) for arch in args.arch for case in cases]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # each compile is single-threaded
        for report in pool.map(_compile_job, jobs):
            print(json.dumps(report), flush=True)
    return 0


def _compile_job(job: tuple[Case, int]) -> dict:
    return compile_case(*job)


if __name__ == "__main__":
    sys.exit(main())
