"""Triton kernels of attnrules (installed as ``attnrules.kernels``).

``pair_topk`` and ``dual_topk`` (one module each: the tile-scoring function and its launch wrapper)
share the streaming top-k kernel of ``topk_stream``. Nothing is imported here, so that importing the
package never needs a GPU or compiles anything.
"""
