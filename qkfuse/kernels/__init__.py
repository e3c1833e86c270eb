"""Kernels behind the qkfuse ops: reference (torch, any device), Triton (CUDA), flashinfer (CUDA, optional)."""


class KernelUnavailable(RuntimeError):
    """An explicitly requested kernel cannot run here (one-line reason)."""
