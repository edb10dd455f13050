"""Benchmarks run on real hardware; each writes JSON + Markdown (+ PNG) under benchmarks/results/."""

# What the bench commands can run; plain data here so the CLI builds its flags without importing torch.
# bench dit (artifex_fp8 also adds an fp8-GEMM-only row)
DIT_VARIANTS = ("diffusers_default", "diffusers_best", "artifex_bf16", "artifex_fp8")
# bench dit, run only when named: Artifex bf16 with one change switched off
DIT_ABLATIONS = ("artifex_bf16_unfused_qkv", "artifex_bf16_no_gelu_epilogue", "artifex_bf16_no_ada_norm")
# bench pipeline: name -> OptimizationConfig fields; "bf16" is Artifex's fastest lossless setup. CFG runs in two
# passes (max_batch_size 1): at 720p one batch of two is no faster (benchmarks/probes/probe1-h100.json: 1606.9 ms
# against 2 x 798.1), and two passes share the first block's self-attention (engine.dit.share_first_block).
PIPELINE_CONFIGS = {
    "bf16": {"use_torch_compile": True, "vae_precision": "bf16"},
    "fp8": {"use_torch_compile": True, "vae_precision": "bf16", "fp8": "all"},
    "fp8_bf16_ends": {"use_torch_compile": True, "vae_precision": "bf16", "fp8": "all", "fp8_bf16_steps": 2},
    "default": {},
}
# bench fewstep: the cases (summary keys) and Artifex's configs (OptimizationConfig fields; bf16 VAE in both)
FEWSTEP_CASES = ("ti2v5b_720p_3step", "i2v_a14b_720p_4step", "tiny_ti2v_3step", "tiny_i2v_4step")
FEWSTEP_CONFIGS = {"bf16": {"vae_precision": "bf16"}, "fp8": {"vae_precision": "bf16", "fp8": "all"}}
