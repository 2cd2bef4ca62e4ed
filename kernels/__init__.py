"""Triton kernels of attnrules (installed as ``attnrules.kernels``).

- ``topk_stream``: the @triton.jit streaming top-k kernel (and its autotuned variant);
- ``pair_topk``, ``dual_topk``: the tile-scoring function of each operation and its entry point,
  returning the kernel's candidates;
- ``plan``: the launch plan (block and buffer sizes, grid, column splits from the GPU's SM count);
- ``launch``: runs the kernel with a plan and reads its buffers back as candidates.

The kernels know rows and columns, not models: merging candidates into the sorted top-k is done by
``attnrules.engine.merge`` (the engine imports the kernels, never the reverse). Nothing is imported
here, so that importing the package never needs a GPU or compiles anything.
"""
