"""Artifex's Wan DiT forward: diffusers' ``WanTransformer3DModel`` math with the repeated work hoisted out.

Rule for this file: the same model, numerically. Every change against diffusers' forward
moves work that does not depend on the step out of the step, or fuses work without
changing what is computed:

- **modulation per distinct timestep**: diffusers embeds one timestep per token for TI2V
  (27,280 rows of 6 x dim in fp32, 2 GB per forward at 720p); here each distinct timestep
  is embedded once and tokens index their row (0 for an image-given frame, t elsewhere);
- **text K/V per request**: the cross-attention keys and values depend only on the prompt
  embeddings, so each block computes them on its first step for a given context tensor and
  reuses them for every later step of the request (the engine passes the same tensors; two
  are kept per block, for CFG's conditional and unconditional passes);
- **the first block's self-attention once per CFG step** (``share_first_block``): CFG's two passes read the
  same latents and timestep and differ first in the first block's cross-attention, so the second pass takes
  the first's self-attention branch as it is (bit for bit);
- **RoPE tables per shape**: built once per latent shape (and per sequence shard), kept in
  the compact (L, D/2) cos/sin form the fused kernel reads;
- **fused QK RMSNorm + RoPE** (``artifex.kernels``: Triton on CUDA, a PyTorch twin elsewhere); with fp8
  attention it writes q and k in e4m3 at static per-head scales bounded by the norm weights
  (``qk_norm_rope_fp8``), so no amax pass or quantization kernel runs over them;
- **one-pass adaptive norms** (``kernels.ada_norm``): gated residual, LayerNorm, modulation and, for fp8
  readers, the row quantization, in one read of each row; a block's last gated residual is added by the next
  block's first norm, the last block's by the model's output norm, which runs in the same kernel;
- **fused QKV projection**: each self-attention's ``to_q``/``to_k``/``to_v`` become one ``to_qkv``
  layer (their weights stacked by output channel), one (dim x 3 dim) GEMM instead of three.
  The three layers are replaced, not kept beside it (diffusers' ``fuse_projections`` keeps
  both copies), so weight memory does not grow; an ``Fp8Linear`` trio joins into one
  ``Fp8Linear`` (per-output-channel scales are row-wise, so they stack unchanged) that
  quantizes the activations once for q, k and v.
- **GELU in the up-projection's epilogue** (``artifex.kernels.linear_gelu``): the feed-forward's
  first GEMM applies bias and tanh-GELU to its fp32 accumulator (cuBLASLt) instead of writing the
  product in bf16 and reading it back for GELU; on CUDA in bf16/fp16, for plain ``nn.Linear``
  weights with no hooks on the feed-forward (offload hooks take the module's own path). With fp8
  layers the GELU moves into the one-pass row quantization of the down-projection's input
  (``kernels.fp8.quantize_rows_fused``), which also quantizes the attention outputs for ``to_out``.

It is applied from outside (``accelerate_model``): the model's and each block's ``forward``
are replaced on the instance, and every weight is still reached through its module, so
memory-tier hooks (group offload, fp8 layerwise casting), Ulysses' hooks and the
attention runtime in each ``WanAttentionProcessor`` keep working. The QKV fusion changes
modules, so it runs before anything hooks them (``Engine._place_models``: after loading and
fp8 quantization, before the memory tier). ``restore_model`` puts diffusers' forwards back and
splits ``to_qkv`` into the three layers again (kept fused, which diffusers' and Artifex's
processors both run, while diffusers hooks are on the model). A block's tensor work is two
functions (``attention_core``: the self-attention; ``rest_core``: the rest), the units that ``torch.compile``
compiles once for all blocks of a model.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch
from torch import nn

from artifex.attention.processor import _TEXT_CONTEXT
from artifex.kernels import compile_static
from artifex.kernels import linear_gelu as lg
from artifex.kernels.ada_norm import ada_norm, ada_norm_torch
from artifex.kernels.ada_norm import decide as ada_decide
from artifex.kernels.fp8 import Fp8Linear, quantize_rows_fused, rows_path
from artifex.kernels.qk_norm_rope import compact_rope, decide, qk_norm_rope, qk_norm_rope_fp8


@dataclass
class Modulation:
    """Timestep embeddings, one row per distinct timestep, and which row each token uses."""

    rows: torch.Tensor  # (R, 6, dim): time_proj for each distinct timestep (the model's dtype)
    temb: torch.Tensor  # (R, dim): time_embedder output for each distinct timestep
    index: torch.Tensor | None  # (B, L) long into rows; None: row b for sample b (R == B)


def mod_table(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table`` (1, k, dim) + ``rows`` (R, k, dim): the k modulation vectors of each distinct timestep, fp32."""
    return table.float() + rows.float()


def pick(mod: torch.Tensor, j: int, index: torch.Tensor | None) -> torch.Tensor:
    """Modulation vector ``j`` of ``mod_table`` per token: (B, L, dim) gathered through ``index``, or (B, 1,
    dim) when each sample has one timestep. Taken where it is used: eagerly a gathered (B, L, dim) fp32 tensor
    lives only for its expression (six of them held for the whole block would be 24 bytes x dim per token);
    under torch.compile the gather fuses into its consumer."""
    return mod[:, j].unsqueeze(1) if index is None else mod[:, j][index]


@dataclass
class FirstBlockShare:
    """The first block's self-attention residual branch for one model input (``share_first_block``): the input
    tensors themselves and their versions (an in-place change between two passes makes them differ)."""

    hidden_states: torch.Tensor
    timestep: torch.Tensor
    versions: tuple[int, int]
    res: torch.Tensor | None = None

    @classmethod
    def of(cls, hidden_states: torch.Tensor, timestep: torch.Tensor) -> FirstBlockShare:
        return cls(hidden_states, timestep, (hidden_states._version, timestep._version))

    def matches(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> bool:
        return (hidden_states is self.hidden_states and timestep is self.timestep
                and (hidden_states._version, timestep._version) == self.versions)


class DiTState:
    """Per-model caches: RoPE tables by latent shape (kept for the model's life: they depend only on the shape,
    the device and the hooks on ``rope``), text context by context tensor (one request's), and, inside
    ``share_first_block``, the first block's self-attention for the current input."""

    def __init__(self):
        self.rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.context: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # (given, image, projected)
        self.sharing = False
        self.share: FirstBlockShare | None = None


@contextlib.contextmanager
def share_first_block(model):
    """Within it, forwards of ``model`` on the same ``hidden_states`` and ``timestep`` tensors (unchanged in
    between) compute the first block's self-attention once: CFG's two passes of a step. The passes differ only
    in the text context, which the first block reads after its self-attention (in its cross-attention), so the
    second pass takes the first's residual branch as it is: the same tensor, bit for bit. Saved per step: one
    of the forward's self-attentions (at TI2V-5B 720p, one of 30 blocks' FA3 call and its q/k/v and output
    GEMMs). Held: that branch, (B, L, dim) in the model's dtype, from the first block of the first pass to the
    first block of the second. A model without Artifex's forward runs as it is; nothing is kept on exit."""
    state = getattr(model, "_artifex_dit", None)
    if state is None:
        yield
        return
    state.sharing = True
    try:
        yield
    finally:
        state.sharing, state.share = False, None


def modulation(model, timestep: torch.Tensor, like: torch.Tensor) -> Modulation:
    """Embed each distinct timestep once: (B,) -> one row per sample; (B, L) -> rows of the distinct values."""
    index = None
    values = timestep
    if timestep.ndim == 2:
        values, index = torch.unique(timestep, return_inverse=True)
    ce = model.condition_embedder
    t = ce.timesteps_proj(values)
    dtype = next(iter(ce.time_embedder.parameters())).dtype
    temb = ce.time_embedder(t.to(dtype) if t.dtype != dtype else t).type_as(like)
    rows = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
    return Modulation(rows=rows, temb=temb, index=index)


def _rope(model, state: DiTState, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Hooks on ``rope`` (Ulysses keeps this rank's slice) are part of the key, so a layout change rebuilds.
    key = (tuple(hidden_states.shape[2:]), hidden_states.device, tuple(model.rope._forward_hooks))
    if key not in state.rope:
        cos, sin = model.rope(hidden_states)  # (1, L, 1, D) each, interleaved pairs
        state.rope[key] = compact_rope(cos, sin)
    return state.rope[key]


def _context(model, state: DiTState, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """The projected context (image tokens first for I2V-style models), once per context tensor."""
    for given, given_image, projected in state.context:
        if given is text and given_image is image:
            return projected
    ce = model.condition_embedder
    projected = ce.text_embedder(text)
    if image is not None:
        projected = torch.cat([ce.image_embedder(image), projected], dim=1)
    state.context = [*state.context[-3:], (text, image, projected)]  # a request holds cond, uncond, both
    return projected


def model_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                  attention_kwargs: dict | None = None):
    """Replaces ``WanTransformer3DModel.forward`` on an instance; same inputs, same output."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    state: DiTState = self._artifex_dit
    b, _, f, h, w = hidden_states.shape
    pt, ph, pw = self.config.patch_size
    rope = _rope(self, state, hidden_states)
    x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, L, dim)
    context = _context(self, state, encoder_hidden_states, encoder_hidden_states_image)
    mod = modulation(self, timestep, encoder_hidden_states)

    qk_path = _qk_path(self, x)
    share = None
    if state.sharing:
        if state.share is None or not state.share.matches(hidden_states, timestep):
            state.share = FirstBlockShare.of(hidden_states, timestep)
        share = state.share
    pending = None  # the last block's gated residual, not yet added (the next norm adds it)
    for i, block in enumerate(self.blocks):  # plain tuples, so hooks that move a block's inputs (split.py) see
        x, *pending = block(x, context, (mod.rows, mod.index), rope, qk_path,  # every tensor
                            share if i == 0 else None, pending)

    x = self.proj_out(_output_norm(self, x, mod, *pending))  # (B, L, p_t * p_h * p_w * C)
    x = x.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _output_norm(model, x: torch.Tensor, mod: Modulation, ff: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The last block's gated residual (``ff`` x ``gate``), ``norm_out`` and the output shift and scale, as diffusers'
    forward computes them: in one pass of the adaptive-norm kernel where it runs (eagerly five passes over fp32
    copies; with the residual folds, the bf16 TI2V-5B 720p profile's copies and other small kernels went from
    2.55 to 1.27 ms: benchmarks/results/dit-h100-run3.json vs dit-h100.json), else diffusers' expressions
    through the ``norm_out`` module (its hooks fire). The modulation is taken to x's device (a two-device split
    keeps the timestep embedding on the first and the last blocks on the second, as diffusers' forward also
    allows)."""
    table = mod_table(model.scale_shift_table, mod.temb.unsqueeze(1)).to(x.device)  # (R, 2, dim): shift, scale
    table = torch.cat([table, gate], dim=1)  # and the last block's gate: (R, 3, dim)
    index = None if mod.index is None else mod.index.to(x.device)
    norm = model.norm_out
    path = "triton" if (isinstance(norm, nn.LayerNorm) and not _hooked(norm) and model._artifex_ada
                        and ada_decide(x.device, x.dtype).path == "triton") else "torch"
    return _ada(norm, x, table, index, path, shift=0, scale=1, res=ff, gate=2)[1]


def _qk_path(model, x: torch.Tensor) -> str:
    """"triton" on CUDA, else "torch" (the twin; ``decide`` caches per device); with "_fp8" appended when the
    self-attention runtime quantizes q and k (fa3-fp8): the kernel then writes them in e4m3 itself."""
    path = decide(x.device, x.dtype).path
    runtime = model.blocks[0].attn1.processor.runtime if len(model.blocks) else None
    return path + "_fp8" if getattr(runtime, "quantizes_qk", False) else path


def block_forward(self, x: torch.Tensor, context: torch.Tensor, mod: tuple[torch.Tensor, torch.Tensor | None],
                  rope: tuple[torch.Tensor, torch.Tensor], qk_path: str = "torch",
                  share: FirstBlockShare | None = None,
                  pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Replaces ``WanTransformerBlock.forward``: text K/V from the cache, then the block's tensor work.
    ``mod`` is a ``Modulation``'s (rows, index); ``rope`` the compact (cos, sin) tables; ``qk_path`` which
    QK-norm + RoPE implementation runs ("triton" or "torch"; "_fp8" appended: it writes e4m3 q and k for
    fa3-fp8, ``_qk_path``). ``share`` (the first block, under ``share_first_block``): where the self-attention's
    residual branch is kept by the first pass of a CFG step and taken by the second.

    ``pending`` is the previous block's feed-forward output and gate (B, L, dim), (R, 1, dim), whose gated
    residual this block's first norm adds (one pass over the tokens instead of two); None for the first block
    (zeros then: x + 0 x 0 is x exactly, and every block runs the same compiled graph). Returns (x, ff, gate):
    the tokens with this block's feed-forward residual still pending (``model_forward`` adds the last one in
    the output norm)."""
    k_txt, v_txt, k_img, v_img = _cross_kv(self, context)
    ffn_path = _ffn_path(self, x)
    out_path, norm_path = _out_path(self, x), _norm_path(self, x, ffn_path)
    attention, rest = self._artifex_core
    res = None
    if share is not None and pending is None:  # the second pass takes the branch (not held past this block)
        res, share.res = share.res, None
    if res is None:
        if pending is None:
            pending = torch.zeros_like(x), torch.zeros(mod[0].shape[0], 1, x.shape[-1], device=x.device)
        x, res = attention(self, x, *pending, mod[0], mod[1], rope[0], rope[1], qk_path, out_path, norm_path)
        if share is not None:
            share.res = res
    return rest(self, x, res, mod[0], mod[1], k_txt, v_txt, k_img, v_img, ffn_path, out_path, norm_path)


def _epilogue_ffn(ffn) -> bool:
    """Whether ``ffn`` is diffusers' FeedForward as Wan builds it: GELU(tanh) with a biased ``proj``, a no-op
    dropout, the down projection; the shape whose GELU can fold into a neighbouring kernel."""
    net = getattr(ffn, "net", None)
    return (isinstance(net, nn.ModuleList) and len(net) == 3 and getattr(net[0], "approximate", None) == "tanh"
            and isinstance(getattr(net[0], "proj", None), (nn.Linear, Fp8Linear)) and net[0].proj.bias is not None
            and isinstance(net[1], nn.Dropout) and net[1].p == 0)


def _ffn_path(block, x: torch.Tensor) -> str:
    """How the feed-forward runs: "cublaslt" (bf16/fp16 ``nn.Linear`` up-projection + GELU as one epilogue
    GEMM), "fp8_gelu" (fp8 layers: GELU inside the down-projection's one-pass row quantization) or "module"
    (its own forward). The first two need the structure ``_epilogue_ffn`` checks, no hooks on the feed-forward
    (offload, casting) and CUDA."""
    if not block._artifex_ffn or _hooked(block.ffn):
        return "module"
    up, down = block.ffn.net[0].proj, block.ffn.net[2]
    if type(up) is nn.Linear:
        plain = up.weight.dtype == x.dtype and up.weight.device == x.device
        return "cublaslt" if plain and lg.decide(x.device, x.dtype).path == "cublaslt" else "module"
    fp8 = all(isinstance(m, Fp8Linear) and m.runs_scaled_mm(x.device) for m in (up, down))
    return "fp8_gelu" if fp8 and rows_path(x.device, x.dtype) == "triton" else "module"


def _out_path(block, x: torch.Tensor) -> str:
    """"fp8_rows" when both attention output projections are fp8 layers on the scaled_mm path, without hooks,
    on CUDA with Triton: the attention outputs are then quantized in one pass (they come from the attention
    kernel, so no compiled kernel could fuse the quantization into their producer); else "module"."""
    layers = (block.attn1.to_out[0], block.attn2.to_out[0])
    fp8 = all(isinstance(m, Fp8Linear) and m.runs_scaled_mm(x.device) and not _hooked(m) for m in layers)
    return "fp8_rows" if fp8 and rows_path(x.device, x.dtype) == "triton" else "module"


def _out_proj(layer, o: torch.Tensor, out_path: str) -> torch.Tensor:
    if out_path == "fp8_rows":
        return layer.forward_quantized(*quantize_rows_fused(o), o.shape[:-1], o.dtype)
    return layer(o)


def _cross_kv(block, context: torch.Tensor):
    """Cross-attention keys and values (B, S, H, D) for ``context``, computed once per context tensor. Two are
    kept: CFG in two passes alternates the conditional and unconditional contexts at every step."""
    for given, kv in block._artifex_kv:
        if given is context:
            return kv
    attn = block.attn2
    image = None
    if attn.add_k_proj is not None:
        split = context.shape[1] - _TEXT_CONTEXT
        image, context_text = context[:, :split], context[:, split:]
    else:
        context_text = context
    if attn.fused_projections:
        k, v = attn.to_kv(context_text).chunk(2, dim=-1)
    else:
        k, v = attn.to_k(context_text), attn.to_v(context_text)
    k = attn.norm_k(k)
    k_img = v_img = None
    if image is not None:
        if attn.fused_projections:
            k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
        else:
            k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
        k_img = attn.norm_added_k(k_img).unflatten(2, (attn.heads, -1))
        v_img = v_img.unflatten(2, (attn.heads, -1))
    kv = (k.unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1)), k_img, v_img)
    block._artifex_kv = [*block._artifex_kv[-1:], (context, kv)]
    return kv


# A Wan block's tensor work on (B, L, dim) tokens is two functions, ``attention_core`` and then ``rest_core``
# (``block_forward`` calls them; ``compiled_block_core`` compiles them). ``rows``/``index`` are the step's
# ``Modulation``; ``norm_path`` (``_norm_path``) says how the three adaptive norms run. Each intermediate is
# dropped (``del``) once used: eagerly (the default, and under offload hooks) Python would otherwise keep every
# local alive to the end of the block, e.g. the fused q/k/v output through the feed-forward (2 A14B blocks at
# 1280x720 over one CFG step, H200: 164 KB per token before, 92 after, diffusers' forward 114;
# benchmarks/results/memory-stages-denoise-h200*.json). Compiled, inductor plans the buffers itself.


def attention_core(block, x, ff, gate, rows, index, cos, sin, qk_path, out_path="module", norm_path="torch"):
    """1. The previous block's gated feed-forward residual (``ff`` x ``gate``), then self-attention: adaptive
    LayerNorm, q/k/v, fused QK RMSNorm + RoPE, attention, output projection. Returns (x, the residual branch
    before its gate; ``rest_core`` adds it). It reads only the tokens and the timestep, so CFG's two passes of a
    step compute the same one in the first block (``share_first_block``)."""
    mod = torch.cat([mod_table(block.scale_shift_table, rows), gate], dim=1)  # the block's six, then ``gate``
    attn = block.attn1
    x, h = _ada(block.norm1, x, mod, index, norm_path, shift=0, scale=1, res=ff, gate=6)
    del ff
    if attn.fused_projections:
        q, k, v = _in_proj(attn.to_qkv, h, x).chunk(3, dim=-1)
    else:
        q, k, v = _in_proj(attn.to_q, h, x), _in_proj(attn.to_k, h, x), _in_proj(attn.to_v, h, x)
    del h
    if qk_path.endswith("_fp8"):  # e4m3 q and k straight from the kernel, for fa3-fp8
        q, k = qk_norm_rope_fp8(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin, attn.heads,
                                qk_path.removesuffix("_fp8"))
        o = attn.processor.runtime.qk8(q, k, v.unflatten(2, (attn.heads, -1))).flatten(2, 3).type_as(x)
    else:
        q, k = qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin, attn.heads,
                            qk_path)
        o = attn.processor.runtime(q, k, v.unflatten(2, (attn.heads, -1))).flatten(2, 3).type_as(x)
    del q, k, v
    return x, _out_proj(attn.to_out[0], o, out_path)


def rest_core(block, x, res, rows, index, k_txt, v_txt, k_img, v_img, ffn_path="module", out_path="module",
              norm_path="torch"):
    """2. and 3. of the block, given ``attention_core``'s residual branch ``res``: its gated residual, the
    cross-attention on the cached text (and image) keys and values, the feed-forward. Returns (x, the
    feed-forward's output, its gate (R, 1, dim)): the next norm adds the gated residual."""
    mod = mod_table(block.scale_shift_table, rows)  # shift, scale, gate, c_shift, c_scale, c_gate

    # 2. Cross-attention on the cached text (and image) keys and values; the gated residual goes in first.
    attn = block.attn2
    x, h = _ada(block.norm2, x, mod, index, norm_path, res=res, gate=2)
    del res
    q = attn.norm_q(_in_proj(attn.to_q, h, x)).unflatten(2, (attn.heads, -1))
    del h
    o = attn.processor.runtime.cross(q, k_txt, v_txt).flatten(2, 3).type_as(x)
    if k_img is not None:
        o = o + attn.processor.runtime.cross(q, k_img, v_img).flatten(2, 3).type_as(x)
    del q
    res = _out_proj(attn.to_out[0], o, out_path)
    del o

    # 3. Feed-forward with adaptive LayerNorm (the cross-attention's residual first) and a gated residual.
    x, h = _ada(block.norm3, x, mod, index, norm_path, shift=3, scale=4, res=res)
    del res
    if ffn_path == "cublaslt":
        up = block.ffn.net[0].proj
        y = lg.linear_gelu(h, up.weight, up.bias, "cublaslt")
        del h
        ff = block.ffn.net[2](y)
        del y
    elif ffn_path == "fp8_gelu":
        y = _in_proj(block.ffn.net[0].proj, h, x)  # bf16 pre-activation from the fp8 GEMM
        del h
        ff = block.ffn.net[2].forward_quantized(*quantize_rows_fused(y, gelu=True), y.shape[:-1], y.dtype)
        del y
    else:
        ff = block.ffn(h)
        del h
    # the gate as a tensor of its own (R, 1, dim), laid out like the first block's zeros: one compiled graph
    return x, ff, mod_table(block.scale_shift_table[:, 5:6], rows[:, 5:6])


def _ada(norm, x, mod, index, norm_path: str, shift=None, scale=None, res=None, gate=None):
    """One of the block's adaptive norms (``kernels.ada_norm`` says what it computes): (x, h), x with ``res``
    added (gated by ``mod``'s vector ``gate``, if given). "torch" runs the block's own expressions through the
    norm module (its hooks fire); "triton" the one-pass kernel; "triton_fp8" the kernel with h quantized by
    row for the fp8 layers that read it (h is then (e4m3, scales), which ``_in_proj`` takes)."""
    if norm_path == "torch":
        out, h = ada_norm_torch(x, mod, index, None, shift, scale, res, gate, norm=norm)
    else:
        out, h = ada_norm(x, mod, index, norm.eps, shift, scale, res, gate, norm.weight, norm.bias,
                          quantize=norm_path == "triton_fp8", path="triton")
    return (x if out is None else out), h


def _in_proj(layer, h, x: torch.Tensor) -> torch.Tensor:
    """``layer`` on a norm's output: a plain call, or the fp8 GEMM on rows ``_ada`` already quantized."""
    return layer.forward_quantized(*h, x.shape[:-1], x.dtype) if isinstance(h, tuple) else layer(h)


def _norm_path(block, x: torch.Tensor, ffn_path: str) -> str:
    """How ``block``'s adaptive norms run: "triton" (the one-pass kernel, bf16/fp16 on CUDA), "triton_fp8"
    (the same, quantizing for the fp8 layers that read the norms: q/k/v, the cross-attention's q and the
    up-projection, all on the scaled_mm path without hooks, the feed-forward on "fp8_gelu"), else "torch"
    (the block's expressions; also whenever a norm is not a LayerNorm, e.g. ``cross_attn_norm=False``'s
    Identity, or hooks sit on one, or ``accelerate_model(ada_norms=False)``)."""
    norms = (block.norm1, block.norm2, block.norm3)
    if not block._artifex_ada or ada_decide(x.device, x.dtype).path != "triton" or any(
            not isinstance(n, nn.LayerNorm) or _hooked(n) for n in norms):
        return "torch"
    attn = block.attn1
    qkv = [attn.to_qkv] if attn.fused_projections else [attn.to_q, attn.to_k, attn.to_v]
    readers = [*qkv, block.attn2.to_q, block.ffn.net[0].proj] if ffn_path == "fp8_gelu" else []
    fp8 = bool(readers) and all(isinstance(m, Fp8Linear) and m.runs_scaled_mm(x.device) and not _hooked(m)
                                for m in readers)
    return "triton_fp8" if fp8 else "triton"


EAGER_CORE = (attention_core, rest_core)


@functools.cache
def compiled_block_core(fullgraph: bool) -> tuple:
    """A block's two parts (``attention_core``, ``rest_core``) compiled once per process: every block of
    every model shares their compiled graphs. Two graphs rather than one, so that the first block can skip its
    self-attention in CFG's second pass (``share_first_block``) without a third graph; nothing fuses across the
    cut (the output projection's GEMM on one side, the residual + norm kernel on the other). ``fullgraph=False``
    is the variant that may break its graph, for attention runtimes that must run eagerly (Ulysses'
    all-to-alls: ``allow_graph_breaks``)."""
    return tuple(compile_static(fn, fullgraph=fullgraph) for fn in EAGER_CORE)


def allow_graph_breaks(model, allowed: bool) -> None:
    """Switch ``model``'s compiled blocks (if any) to the core that may (or may not) break its graph."""
    for block in model.blocks:
        if getattr(block, "_artifex_core", None) is compiled_block_core(allowed):
            block._artifex_core = compiled_block_core(not allowed)


_QKV = ("to_q", "to_k", "to_v")


def _weights(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    """A linear layer's tensors whose rows are its output channels (weight, per-channel scales, bias)."""
    names = ("weight_fp8", "weight_scale") if isinstance(layer, Fp8Linear) else ("weight",)
    return {**{n: getattr(layer, n) for n in names}, "bias": layer.bias}


def _build(like: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
    """A layer of ``like``'s kind holding ``tensors`` (as ``_weights`` names them), without allocating others."""
    weight = tensors["weight_fp8"] if isinstance(like, Fp8Linear) else tensors["weight"]
    out_features, in_features = weight.shape
    bias = tensors["bias"] is not None
    if isinstance(like, Fp8Linear):
        layer = Fp8Linear(in_features, out_features, bias, device="meta", path=like.path)
    else:
        layer = nn.Linear(in_features, out_features, bias, device="meta")
    for name, t in tensors.items():
        if t is None:
            continue
        if name in layer._buffers:
            setattr(layer, name, t)
        else:
            setattr(layer, name, nn.Parameter(t, requires_grad=getattr(like, name).requires_grad))
    return layer.train(like.training)


def _hooked(module: nn.Module) -> bool:
    """Whether hooks (torch's, or diffusers' memory-tier ones) sit on ``module`` or below it."""
    return any(m._forward_hooks or m._forward_pre_hooks or getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
               for m in module.modules())


def _fusable(attn) -> bool:
    if attn.is_cross_attention or attn.fused_projections or not all(hasattr(attn, n) for n in _QKV):
        return False
    first, *rest = layers = [getattr(attn, n) for n in _QKV]
    if type(first) not in (nn.Linear, Fp8Linear) or any(map(_hooked, layers)):
        return False  # adapters, or hooks on a layer: leave the model as it is

    def kind(m):  # what must agree for the rows to stack into one layer
        w = next(iter(_weights(m).values()))
        return type(m), m.in_features, m.bias is None, getattr(m, "path", None), w.dtype, w.device

    return all(kind(m) == kind(first) for m in rest)


@torch.no_grad()
def fuse_qkv(attn) -> bool:
    """Replace a self-attention's ``to_q``/``to_k``/``to_v`` with one ``to_qkv`` (rows q, then k, then v) and
    set ``fused_projections``, which diffusers' and Artifex's processors and ``attention_core`` read. The three
    layers are dropped: weights are held once (the stacked copy is made one layer at a time). Returns whether
    it fused; cross-attention, an already fused layer, or layers other than plain ``nn.Linear``/``Fp8Linear``
    trios are left as they are."""
    if not _fusable(attn):
        return False
    layers = [getattr(attn, n) for n in _QKV]
    parts = [_weights(m) for m in layers]
    fused = _build(layers[0], {n: None if t is None else torch.cat([p[n] for p in parts])
                               for n, t in parts[0].items()})
    for n in _QKV:
        delattr(attn, n)
    del layers, parts
    attn.to_qkv = fused
    attn.fused_projections = True
    attn._artifex_qkv = [attn.inner_dim, attn.kv_inner_dim, attn.kv_inner_dim]  # the rows of q, k, v
    return True


@torch.no_grad()
def unfuse_qkv(attn) -> bool:
    """Undo ``fuse_qkv``: ``to_q``/``to_k``/``to_v`` again, each with its own copy of its rows. Returns whether it
    split; a layer fused elsewhere (diffusers' ``fuse_projections``) or one with hooks on it is left alone."""
    sizes = attn.__dict__.get("_artifex_qkv")
    if sizes is None or _hooked(attn.to_qkv):
        return False
    fused = attn.to_qkv
    tensors = _weights(fused)
    start = 0
    for name, rows in zip(_QKV, sizes):
        part = {n: None if t is None else t[start:start + rows].clone() for n, t in tensors.items()}
        setattr(attn, name, _build(fused, part))
        start += rows
    del attn.to_qkv, attn._artifex_qkv
    attn.fused_projections = False
    return True


def accelerate_model(model, compile_blocks: bool = False, fuse_projections: bool = True,
                     ffn_epilogue: bool = True, ada_norms: bool = True) -> None:
    """Give ``model`` (a diffusers WanTransformer3DModel, or S2V's ``WanS2VTransformer3DModel``: ``engine.dit_s2v``)
    Artifex's forward; idempotent.

    Needs Artifex's ``WanAttentionProcessor`` on every attention layer (``attention.install``):
    the blocks call the attention runtime it holds. ``compile_blocks`` compiles the block's two parts
    once (``compiled_block_core``; all blocks share the compiled code; shapes are static per request).
    Self-attention q/k/v are fused (``fuse_qkv``) here, so call it after the weights are loaded
    (and fp8-quantized, if they are) and before memory-tier hooks go on.
    ``fuse_projections``, ``ffn_epilogue`` and ``ada_norms`` (the one-pass adaptive norms; all on by
    default) switch those changes, for benchmarks that measure what each buys (``artifex bench dit
    --variants``); switching ``fuse_projections`` off on an accelerated model splits its q/k/v again.
    """
    if getattr(model, "_artifex_dit", None) is None:
        model._artifex_dit = DiTState()
        forward = model_forward
        if type(model).__name__ == "WanS2VTransformer3DModel":  # S2V's sequence around the same blocks
            from artifex.engine.dit_s2v import model_forward as forward
        model.forward = types.MethodType(forward, model)
        for block in model.blocks:
            block.forward = types.MethodType(block_forward, block)
    core = compiled_block_core(True) if compile_blocks else EAGER_CORE
    model._artifex_ada = ada_norms  # the output norm follows the blocks' switch
    for block in model.blocks:
        (fuse_qkv if fuse_projections else unfuse_qkv)(block.attn1)
        block._artifex_kv = []
        block._artifex_core = core
        block._artifex_ffn = ffn_epilogue and _epilogue_ffn(block.ffn)
        block._artifex_ada = ada_norms


def restore_model(model) -> None:
    """Put diffusers' forwards back, drop the caches, and split the fused q/k/v into diffusers' three layers.
    While diffusers hooks (group offload, layerwise casting) are on the model, q/k/v stay fused: the hooks hold
    the fused layer, and diffusers' processor (like Artifex's) runs fused projections."""
    if getattr(model, "_artifex_dit", None) is None:
        return
    split = not _hooked_by_diffusers(model)
    for module in (model, *model.blocks):
        module.__dict__.pop("forward", None)
        for name in ("_artifex_kv", "_artifex_core", "_artifex_ffn", "_artifex_ada"):
            module.__dict__.pop(name, None)
    if split:
        for block in model.blocks:
            unfuse_qkv(block.attn1)
    del model._artifex_dit


def _hooked_by_diffusers(model) -> bool:
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in model.modules())


def clear_caches(model) -> None:
    """Forget the request's cached text context and cross-attention K/V (they hold that request's tensors)."""
    state = getattr(model, "_artifex_dit", None)
    if state is not None:
        state.context.clear()
        for block in model.blocks:
            block._artifex_kv = []
