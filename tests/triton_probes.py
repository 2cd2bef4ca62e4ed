"""Triton probes shared by the interpreter and GPU tests: small kernels that expose a piece of the
engine's kernel arithmetic to a test."""
import triton
import triton.language as tl

from attnrules.kernels import topk_stream


@triton.jit
def state_probe(out_ptr, pid_s, n_rows, r0, pid_r, n_splits, CAP: tl.constexpr, GLOBAL: tl.constexpr):
    """Stores the kernel's state-buffer base offset and first-slot index for one program."""
    s0, first = topk_stream.state_base(pid_s, n_rows, r0, pid_r, n_splits, CAP, GLOBAL)
    tl.store(out_ptr, s0)
    tl.store(out_ptr + 1, first)
