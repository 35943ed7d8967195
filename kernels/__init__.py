"""Triton kernels of localsgl (installed as ``localsgl_kernels``)."""
