"""Triton kernels of attnrules (installed as ``attnrules.kernels``).

- ``topk_stream``: the @triton.jit streaming top-k kernel (filter, rescore, compaction) and its
  default configuration;
- ``pair_topk``, ``dual_topk``: the tile-scoring function of each operation and its entry point,
  returning the kernel's buffers;
- ``plan``: the launch plan (block and buffer sizes, grid, column splits from the GPU's SM count,
  the filter's proven error margin);
- ``launch``: runs the kernel with a plan and returns its buffers;
- ``resources``: registers and spills of the compiled kernel for a GPU architecture (no GPU needed).

The kernels know rows and columns, not models: decoding the buffers and merging candidates into the
sorted top-k is done by the engine (``attnrules.engine.triton_backend`` with the engine's one merge,
``attnrules.engine.merge``; the engine imports the kernels, never the reverse). Nothing is imported
here, so that importing the package never needs a GPU or compiles anything.
"""
