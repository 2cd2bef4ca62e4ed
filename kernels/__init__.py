"""Triton kernels of attnrules (installed as ``attnrules.kernels``)."""
