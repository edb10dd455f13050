"""Benchmarks run on real hardware; each writes JSON + Markdown (+ PNG) under benchmarks/results/."""
