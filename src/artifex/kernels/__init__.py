"""Fused kernels, each with a plain-PyTorch twin (the twin runs on CPU and in tests)."""
