"""The text tower of MiniCPM-V 4.6 (Qwen3.5's hybrid decoder) written for the engine's decode step.

transformers' modules stay the reference (and run every prompt forward); this is the same
computation for one new token per row over the engine's `SlotCache`, in the fewest operations:

- projections fused into one matrix product each (`Proj`): a linear-attention layer's q/k/v, z, b
  and a inputs; a full-attention layer's query (with its gate), key and value; the MLP's gate and
  up. The fused weights are built once from the checkpoint's own tensors, and the transformers
  modules' weights become views into them, so the model holds each weight once (no conversion
  step, no second copy);
- a linear-attention step that updates the slot's conv and recurrent state in place (the gated
  delta rule for one position: decay, delta update, read-out), no sequence loop, no chunking;
- attention over the slot cache with grouped heads (queries of a key/value head batched against
  it: no repeated keys or values) and a mask computed from the rows' lengths, not built by
  transformers' mask utilities;
- no kwargs plumbing, output records, mask mappings or cache objects of transformers: the step is a
  plain function of tensors, which inductor compiles whole (`deployments/engine/compiled.py`).

Positions are the text positions the engine uses (1-D, as for text and for images alike in this
model), so the multimodal rotary embedding reduces to the plain rotary one on the first
`partial_rotary_factor` of each head. Dtypes follow the reference: norms and the linear-attention
recurrence in float32, the recurrent state kept in float32, everything else in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deployments.engine.slots import SlotCache


class Proj(torch.nn.Module):
    """A bias-free projection: several linear layers of the same input fused into one weight (their outputs
    concatenated), each layer's weight becoming a view into it, so the reference forward keeps working on the
    same memory. On a CPU that emulates bf16 the checkpoint's layers are `RowAdaptiveLinear`s (one row from the
    bf16 weight, several from an fp32 copy): their fp32 copies are fused and chosen the same way."""

    def __init__(self, *modules: torch.nn.Linear) -> None:
        super().__init__()
        if any(m.bias is not None for m in modules):
            raise ValueError("the engine's text tower takes bias-free projections only")
        self.register_buffer("weight", _fused(modules, "weight"), persistent=False)
        adaptive = all(getattr(m, "weight_f32", None) is not None for m in modules)
        self.register_buffer("weight_f32", _fused(modules, "weight_f32") if adaptive else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_f32 is not None and x.shape[0] > 1:
            return F.linear(x.float(), self.weight_f32).to(x.dtype)
        return F.linear(x, self.weight)


def _fused(modules: tuple[torch.nn.Linear, ...], name: str) -> torch.Tensor:
    if len(modules) == 1:
        return getattr(modules[0], name).detach()
    fused = torch.cat([getattr(m, name).detach() for m in modules]).contiguous()
    start = 0
    for module in modules:
        rows = getattr(module, name).shape[0]
        view = fused[start : start + rows]
        if name == "weight":
            module.weight = torch.nn.Parameter(view, requires_grad=False)
        else:
            module.register_buffer(name, view, persistent=False)
        start += rows
    return fused


class _Norm(torch.nn.Module):
    """Qwen3.5's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, back to x's dtype."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("scale", (1.0 + module.weight.detach().float()).contiguous(), persistent=False)
        self.eps = module.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)


class _Linear(torch.nn.Module):
    """One layer's linear-attention (gated delta net) step, its input projections fused."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.index = module.layer_idx
        self.w_in = Proj(module.in_proj_qkv, module.in_proj_z, module.in_proj_b, module.in_proj_a)
        self.out = Proj(module.out_proj)
        _buffers(self, conv=module.conv1d.weight.detach()[:, 0],  # (channels, kernel)
                 decay=-module.A_log.detach().float().exp(), dt_bias=module.dt_bias.detach(),
                 norm_weight=module.norm.weight.detach())
        self.splits = [module.conv_dim, module.value_dim, module.num_v_heads, module.num_v_heads]
        self.qkv_splits = [module.key_dim, module.key_dim, module.value_dim]
        if module.conv1d.bias is not None:
            raise ValueError("the engine's text tower takes a bias-free conv1d")
        self.norm_eps = module.norm.variance_epsilon
        self.k_heads, self.v_heads = module.num_k_heads, module.num_v_heads
        self.k_dim, self.v_dim = module.head_k_dim, module.head_v_dim

    def forward(self, x: torch.Tensor, cache: SlotCache, rows: int) -> torch.Tensor:
        mixed, z, b, a = self.w_in(x).split(self.splits, dim=-1)
        conv_state = cache.conv[self.index][:rows]  # (rows, channels, kernel)
        window = torch.cat([conv_state[:, :, 1:], mixed.to(conv_state.dtype)[:, :, None]], dim=-1)
        conv_state.copy_(window)
        mixed = F.silu((window * self.conv).sum(-1)).to(x.dtype)
        q, k, v = mixed.split(self.qkv_splits, dim=-1)
        q = q.float().view(rows, self.k_heads, self.k_dim)
        k = k.float().view(rows, self.k_heads, self.k_dim)
        v = v.float().view(rows, self.v_heads, self.v_dim)
        if self.k_heads != self.v_heads:
            q = q.repeat_interleave(self.v_heads // self.k_heads, dim=1)
            k = k.repeat_interleave(self.v_heads // self.k_heads, dim=1)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * self.k_dim ** -0.5
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(b).float()[..., None]  # (rows, heads, 1)
        gate = (self.decay * F.softplus(a.float() + self.dt_bias)).exp()[..., None, None]
        state = cache.recurrent[self.index][:rows]  # (rows, heads, k_dim, v_dim), float32
        decayed = state * gate
        delta = (v - torch.matmul(k[:, :, None], decayed)[:, :, 0]) * beta
        updated = decayed + k[..., None] * delta[:, :, None]
        state.copy_(updated)
        out = torch.matmul(q[:, :, None], updated)[:, :, 0].to(x.dtype)  # (rows, heads, v_dim)
        h = out.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm_eps)).to(x.dtype)
        h = (self.norm_weight * h) * F.silu(z.float().view(rows, self.v_heads, self.v_dim))
        return self.out(h.to(x.dtype).reshape(rows, -1))


class _Attention(torch.nn.Module):
    """One layer's full attention (gated query, grouped key/value heads, partial rotary), its projections fused."""

    def __init__(self, module: torch.nn.Module, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.index = module.layer_idx
        self.qkv, self.out = Proj(module.q_proj, module.k_proj, module.v_proj), Proj(module.o_proj)
        self.head_dim, self.heads, self.kv_heads = module.head_dim, heads, kv_heads
        self.splits = [2 * heads * module.head_dim, kv_heads * module.head_dim, kv_heads * module.head_dim]
        self.q_norm, self.k_norm = _Norm(module.q_norm), _Norm(module.k_norm)
        self.scaling = module.scaling

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: SlotCache, rows: int,
                 mask: torch.Tensor | None) -> torch.Tensor:
        qg, k, v = self.qkv(x).split(self.splits, dim=-1)
        qg = qg.view(rows, self.heads, 2 * self.head_dim)
        q, gate = qg[..., : self.head_dim], qg[..., self.head_dim :].reshape(rows, -1)
        q = _rotate(self.q_norm(q), cos, sin)
        k = _rotate(self.k_norm(k.view(rows, self.kv_heads, self.head_dim)), cos, sin)
        keys, values = cache.update(k[:, :, None], v.view(rows, self.kv_heads, 1, self.head_dim), self.index)
        groups = self.heads // self.kv_heads
        scores = torch.matmul(q.view(rows, self.kv_heads, groups, self.head_dim), keys.transpose(-1, -2))
        scores = scores.float() * self.scaling  # (rows, kv_heads, groups, columns)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(weights, values).reshape(rows, -1)
        return self.out(out * torch.sigmoid(gate))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first `cos.shape[-1]` channels of each head of x (rows, heads, head_dim)."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)


class _MLP(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.gate_up, self.down = Proj(module.gate_proj, module.up_proj), Proj(module.down_proj)
        self.intermediate = module.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


def _buffers(module: torch.nn.Module, **tensors: torch.Tensor) -> None:
    """Weights as non-persistent buffers: a compiled step treats them as the module's (no guard per tensor)."""
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor, persistent=False)


class TextTower(torch.nn.Module):
    """The decode step of the text tower: `(ids (rows, 1), positions (rows, 1), cache) -> logits (rows, vocab)`,
    the signature of `DecodeStep`'s eager forward (the mask argument is unused: lengths give it)."""

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        config = text_model.config
        rope = config.rope_parameters
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"the engine's text tower supports the default rotary embedding, not {rope['rope_type']}")
        self.pre, self.mixers, self.post, self.mlps = (torch.nn.ModuleList() for _ in range(4))
        for layer in text_model.layers:
            self.pre.append(_Norm(layer.input_layernorm))
            self.mixers.append(_Linear(layer.linear_attn) if hasattr(layer, "linear_attn")
                               else _Attention(layer.self_attn, config.num_attention_heads, config.num_key_value_heads))
            self.post.append(_Norm(layer.post_attention_layernorm))
            self.mlps.append(_MLP(layer.mlp))
        self.norm = _Norm(text_model.norm)
        self.head = Proj(lm_head)
        _buffers(self, embed=text_model.embed_tokens.weight.detach(),
                 inv_freq=text_model.rotary_emb.inv_freq.detach().float())

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: SlotCache) -> torch.Tensor:
        rows = ids.shape[0]
        x = F.embedding(ids[:, 0], self.embed)
        freqs = positions.float() * self.inv_freq  # (rows, rotary_dim / 2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (rows, 1, rotary_dim): broadcast over heads
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        visible = None
        if rows > 1:  # rows of unequal lengths: each sees its own columns only
            visible = cache._columns[None, :] <= positions
        for pre, mixer, post, mlp in zip(self.pre, self.mixers, self.post, self.mlps):
            h = pre(x)
            x = x + (mixer(h, cache, rows) if isinstance(mixer, _Linear) else mixer(h, cos, sin, cache, rows, visible))
            x = x + mlp(post(x))
        return self.head(self.norm(x))
