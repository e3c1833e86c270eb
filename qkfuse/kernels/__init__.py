"""Kernels behind the qkfuse ops: reference (torch, any device), Triton (CUDA), flashinfer (CUDA, optional)."""
