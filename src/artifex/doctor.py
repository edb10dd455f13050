"""``artifex doctor``: what this machine can run, what was verified, and what would make it faster.

The setup guide's test_flash_attention.py, grown up: GPU, driver, torch / CUDA / cuDNN,
every attention backend's status with the reason when it cannot run, its verification
against a float64 reference, the environment variables that matter with advice, and
what to install next for this GPU. Works on a machine without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch

from artifex.attention.backends import BACKENDS, backend_versions, probe
from artifex.attention.select import DTYPE_NAMES, verify
from artifex.env import VARIABLES, read_env
from artifex.sysinfo import device_info, versions

# (variable, recommended value or None, advice)
_ENV_ADVICE = [
    ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True",
     "lets the caching allocator grow segments instead of fragmenting: fewer OOMs at Wan's large activations"),
    ("TOKENIZERS_PARALLELISM", "false",
     "silences the tokenizers fork warning in servers and avoids its thread pool fighting the workers"),
    ("CUDA_VISIBLE_DEVICES", None, "which GPUs this process sees; unset = all"),
    ("CUDA_LAUNCH_BLOCKING", None, "set to 1 only for debugging: it serializes every kernel launch"),
]


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _advice(device: torch.device, status: dict) -> list[str]:
    tips = []
    if device.type != "cuda":
        return ["no CUDA GPU visible: generation runs on the CPU (only the tiny models are practical); "
                "install a CUDA build of torch on a machine with an NVIDIA GPU"]
    major, minor = torch.cuda.get_device_capability(device)
    sm = major * 10 + minor
    missing = {n for n, s in status.items() if s["reason"] and "not installed" in s["reason"]}
    if sm == 90 and "fa3" in missing:
        tips.append("Hopper GPU without FlashAttention-3: `pip install fa3-fwd` (forward kernels, bf16 and fp8) "
                    "or build flash-attention/hopper; measured fastest at Wan shapes on the H100")
    if sm < 90:
        tips.append(f"sm{sm}: FlashAttention-3 needs sm90 (Hopper). The best kernels here are cuDNN SDPA (built in) "
                    "and FlashAttention-2" + (" (`pip install flash-attn --no-build-isolation`)"
                                              if "fa2" in missing else ""))
    if sm >= 80 and "sage" in missing:
        tips.append("optional: `pip install sageattention` (int8 attention; verify its error with `artifex doctor`)")
    if not torch.backends.cudnn.is_available():
        tips.append("cuDNN is not available to torch: the sdpa-cudnn backend cannot run")
    return tips


def diagnose(dtype: str = "bf16", run_verification: bool = True, head_dim: int = 128) -> dict:
    """Everything the doctor reports, as data."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = DTYPE_NAMES[dtype]
    status = {}
    for name, backend in BACKENDS.items():
        reason = probe(backend, device, dt, head_dim)
        entry = {"description": backend.description, "available": reason is None, "reason": reason,
                 "install": backend.install, "verified": None, "rel_l2": None, "bound": None}
        if reason is None and run_verification:
            v = verify(name, device, dt, head_dim)
            entry.update(verified=v.ok, rel_l2=v.rel_l2, bound=v.bound, reason=v.reason)
        status[name] = entry
    env = read_env()
    return {
        "kernels": kernels(device, dt),
        "device": device_info(device),
        "driver": _driver(),
        "versions": versions(),
        "kernel_packages": backend_versions(),
        "dtype": dtype,
        "head_dim": head_dim,
        "backends": status,
        "environment": [
            {"name": k, "value": os.environ.get(k), "recommended": rec, "advice": why}
            for k, rec, why in [*_ENV_ADVICE, *((k, None, why) for k, why in VARIABLES.items())]
        ],
        "artifex_home": str(env.home),
        "advice": _advice(device, status),
    }


def kernels(device: torch.device, dtype: torch.dtype) -> dict:
    """The DiT's and the VAE's fused kernels: which path each takes here, and why (each has a PyTorch twin that
    always runs)."""
    from artifex.kernels import ada_norm, fp8, linear_gelu, rms_silu
    from artifex.kernels.qk_norm_rope import decide

    qk = decide(device, dtype)
    gemm = fp8.decide(device)
    gelu = linear_gelu.decide(device, dtype)
    rows = fp8.decide_rows(device, dtype)
    ada = ada_norm.decide(device, dtype)
    vae = rms_silu.decide(device, dtype)
    return {"qk_norm_rope": {"path": qk.path, "reason": qk.reason},
            "adaptive_norms": {"path": ada.path, "reason": ada.reason},
            "ffn_gelu_epilogue": {"path": gelu.path, "reason": gelu.reason},
            "fp8_gemm": {"path": gemm.path, "reason": gemm.reason,
                         "fp8_mode": "available" if gemm.path == "scaled_mm" else "refused (fp8 = off only)"},
            "fp8_row_quantize": {"path": rows.path, "reason": rows.reason},
            "vae_rms_silu": {"path": vae.path, "reason": vae.reason}}


def render(report: dict) -> str:
    d, v = report["device"], report["versions"]
    lines = ["Artifex doctor", ""]
    if d["type"] == "cuda":
        lines.append(f"GPU      {d['name']} ({d['capability']}, {d['memory_gib']} GiB), driver {report['driver']}")
    else:
        lines.append(f"GPU      none visible; CPU {d['name']} ({d['threads']} threads)")
    lines.append(f"torch    {v['torch']}  CUDA {v['cuda']}  cuDNN {v['cudnn']}  Python {v['python']}")
    lines.append(f"libs     diffusers {v['diffusers']}  transformers {v['transformers']}  artifex {v['artifex']}")
    lines += ["", f"attention backends ({report['dtype']}, head_dim {report['head_dim']}; "
                  "verified = relative L2 against a float64 reference within the dtype's bound):"]
    for name, s in report["backends"].items():
        if not s["available"]:
            state = f"unavailable: {s['reason']}"
        elif s["verified"] is None:
            state = "available (not verified)"
        elif s["verified"]:
            state = f"verified   rel L2 {s['rel_l2']:.1e} <= {s['bound']:.0e}"
        else:
            state = f"REJECTED   {s['reason']}"
        lines.append(f"  {name:15s} {state}")
    k = report["kernels"]
    lines += ["", "DiT kernels:",
              f"  {'qk_norm_rope':15s} {k['qk_norm_rope']['path']}: {k['qk_norm_rope']['reason']}",
              f"  {'adaptive norms':15s} {k['adaptive_norms']['path']}: {k['adaptive_norms']['reason']}",
              f"  {'FFN GELU':15s} {k['ffn_gelu_epilogue']['path']}: {k['ffn_gelu_epilogue']['reason']}",
              f"  {'fp8 GEMMs':15s} {k['fp8_gemm']['path']}: {k['fp8_gemm']['reason']} (config fp8: "
              f"{k['fp8_gemm']['fp8_mode']})",
              f"  {'fp8 row quant':15s} {k['fp8_row_quantize']['path']}: {k['fp8_row_quantize']['reason']}",
              "", "VAE kernels (fast_vae):",
              f"  {'RMS norm + SiLU':15s} {k['vae_rms_silu']['path']}: {k['vae_rms_silu']['reason']}"]
    lines += ["", "environment:"]
    for e in report["environment"]:
        value = e["value"] if e["value"] is not None else "(unset)"
        rec = ""
        if e["recommended"] and e["value"] != e["recommended"]:
            rec = f"  -> recommended: {e['name']}={e['recommended']}"
        lines.append(f"  {e['name']:24s} {value}{rec}")
        lines.append(f"  {'':24s} {e['advice']}")
    if report["advice"]:
        lines += ["", "to go faster here:"] + [f"  - {t}" for t in report["advice"]]
    return "\n".join(lines)
