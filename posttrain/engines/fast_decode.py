"""A lean decode loop for Llama / Qwen2-family causal LMs.

Hugging Face ``generate`` spends most of a small model's decode step in Python (cache objects, mask
builders, logits processors): ~6 ms per step where the arithmetic needs a fraction of that. This
module runs the same maths with plain tensor ops over weights read from the HF model:

- a static, preallocated KV cache, one ``[B, kv_heads, T, head_dim]`` tensor per layer (no per-step
  concatenation);
- single-token steps use matmul attention over the whole cache with an additive mask, grouped by KV
  head so GQA needs no ``repeat_kv`` copy;
- the prefill runs projections and MLP on the real prompt tokens only (packed), attention on the
  padded layout;
- left padding: pad slots are masked out of every key set, and position ids count only real tokens
  (the convention ``generate`` uses), so a left-padded row decodes exactly like the row alone;
- optional ``torch.compile`` of the decode step (weights, cache and masks are arguments, so swapping
  in new trainer weights never triggers a recompile; a new batch size / cache length does).

Numerics follow the HF modules op for op (RMSNorm in fp32, rotate-half RoPE from the model's own
``inv_freq``, ``F.linear`` on the original weight layout), which is why fp32 greedy outputs match
``generate`` token for token. In the model's dtype the weights are *views* of the model's parameters
(no copy): in-place optimizer steps are seen immediately. Another ``dtype`` (e.g. bf16) holds cast
copies, which :meth:`FastDecoder.refresh` rewrites in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.errors import ModelError

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq does not depend on the sequence length


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run ``model`` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"architecture {name} is not one of {', '.join(SUPPORTED)}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act!r} (only 'silu')"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in _STATIC_ROPE:
        return f"rope_type={rope.get('rope_type')!r} (supported: {', '.join(_STATIC_ROPE)})"
    return None


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # same op order as LlamaRMSNorm: normalise in fp32, cast back, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # HF: x*cos + cat(-x2, x1)*sin. roll gives cat(x2, x1) and sin_signed = cat(-sin1, sin2), so the
    # products are bit-identical (a sign flip is exact) with 4 ops instead of 7
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


class FastDecoder:
    """Prefill + single-token decode steps for one supported HF model.

    ``prefill(ids, mask)`` fills a fresh cache and returns the last position's logits; ``step(tokens)``
    feeds one token per row and returns the next logits. Logits are fp32 ``[B, V]``.
    """

    def __init__(self, model, dtype: torch.dtype | None = None, compile: bool = False):
        reason = unsupported_reason(model)
        if reason:
            raise ModelError(f"the fast decode path cannot run this model: {reason}",
                             fix="use fast='auto' or fast=False to fall back to the generic HF loop")
        cfg = model.config
        self.model, self.compile = model, compile
        self.dtype = dtype or next(model.parameters()).dtype
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.device = next(model.parameters()).device
        self._weights: list[torch.Tensor | None] | None = None
        self._cos = self._sin = None
        self._compiled = None  # one torch.compile wrapper; dynamo keeps one graph per shape
        self.reduce_attention = compile and self.dtype != torch.float32
        self.refresh()

    # ------------------------------------------------------------------ weights
    # Flat weight list: [embed, final_norm, lm_head] + per layer _PER_LAYER entries:
    # [ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gate_up, b_gate_up, w_down, b_down]
    _PER_LAYER = 10

    def refresh(self) -> None:
        """(Re)read the weights from the model; call after every weight change.

        In the model's dtype single projections are views of the parameters (no copy). Q/K/V and
        gate/up are concatenated into one matrix each (one matmul instead of three / two: fewer ops
        per step, same bits since each output column is the same dot product), which is a copy.
        A compiled step takes the list as an argument, so new tensors do not trigger a recompile."""
        m = self.model.model

        def view(t):  # same dtype: a view sharing the parameter's storage
            return None if t is None else t.detach().to(self.dtype)

        def fused(*ts):
            return None if ts[0] is None else torch.cat([t.detach() for t in ts]).to(self.dtype)

        embed = view(m.embed_tokens.weight)
        tied = self.model.lm_head.weight is m.embed_tokens.weight  # one cast copy, not two
        w = [embed, view(m.norm.weight), embed if tied else view(self.model.lm_head.weight)]
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            w += [view(layer.input_layernorm.weight),
                  fused(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                  fused(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                  view(a.o_proj.weight), view(a.o_proj.bias),
                  view(layer.post_attention_layernorm.weight),
                  fused(mlp.gate_proj.weight, mlp.up_proj.weight), fused(mlp.gate_proj.bias, mlp.up_proj.bias),
                  view(mlp.down_proj.weight), view(mlp.down_proj.bias)]
        self._weights = w
        rot = m.rotary_emb
        self._inv_freq, self._rope_scale = rot.inv_freq.detach().float(), rot.attention_scaling
        self._cos = self._sin = None

    def release(self) -> None:
        """Drop the fused and cast weight copies between generations (up to a whole model in the engine's
        dtype); the next ``refresh`` reads the current weights again."""
        self._weights = None

    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin: [N, head_dim] each, computed like the HF rotary module (fp32, then cast)."""
        if self._cos is None or self._cos.shape[0] < length:
            # sized once to max_position_embeddings so a compiled step sees one table shape
            size = max(length, getattr(self.model.config, "max_position_embeddings", 0) or 0, 256)
            pos = torch.arange(size, device=self.device).float()
            freqs = pos[:, None] * self._inv_freq.to(self.device)[None, :]  # [N, D/2]
            cos, sin = freqs.cos() * self._rope_scale, freqs.sin() * self._rope_scale
            self._cos = torch.cat((cos, cos), dim=-1).to(self.dtype)
            self._sin = torch.cat((-sin, sin), dim=-1).to(self.dtype)
        return self._cos, self._sin

    def _layer(self, li: int) -> list:
        return self._weights[3 + self._PER_LAYER * li: 3 + self._PER_LAYER * (li + 1)]

    def _mlp(self, x, lw):
        gate, up = F.linear(x, lw[6], lw[7]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw[8], lw[9])

    # ------------------------------------------------------------------ generation
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, total_len: int, repeat: int = 1) -> torch.Tensor:
        """Run the prompts, allocate the cache and return the last logits.

        ids, mask: [U, P] left-padded prompts (mask 1 = real token). ``total_len`` = cache slots per
        row (>= P + new tokens). ``repeat``: each prompt's cache is copied to ``repeat`` consecutive
        rows, so n samples per prompt share one prefill. Returns logits [U*repeat, V] (fp32).
        """
        U, P = ids.shape
        H, Hkv, D, L = self.n_heads, self.n_kv, self.head_dim, len(self.model.model.layers)
        mask = mask.bool()
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)  # [U, P], as generate computes it
        # Projections and MLP run on the N real tokens only ("packed"); attention runs on the padded
        # [U, P] layout, where pad slots hold zeros. Mixed prompt lengths leave a third of a padded
        # batch as padding, and the projections are most of the prefill's time.
        real = mask.flatten().nonzero().squeeze(1)  # [N] indices into U*P
        last = mask.sum(1).cumsum(0) - 1  # [U] packed index of each row's last token (left padding)
        cos_t, sin_t = self._rope_table(total_len)
        cos, sin = cos_t[pos.flatten()[real]][:, None], sin_t[pos.flatten()[real]][:, None]  # [N, 1, D]
        # [U, 1, P, P]: causal, real keys only; the diagonal stays on so pad queries never see an
        # all-masked row (which would put NaN into the cache)
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        attn = ((causal & mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device))[:, None]
        x = F.embedding(ids.flatten()[real], self._weights[0])  # [N, hidden]
        ks, vs = [], []
        for li in range(L):
            lw = self._layer(li)
            h = _rms_norm(x, lw[0], self.eps)
            qkv = F.linear(h, lw[1], lw[2]).view(-1, H + 2 * Hkv, D)
            qkv[:, :H + Hkv] = _rope(qkv[:, :H + Hkv], cos, sin)
            qkv = qkv.new_zeros(U * P, H + 2 * Hkv, D).index_copy_(0, real, qkv).view(U, P, H + 2 * Hkv, D)
            q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]))
            ks.append(k)  # [U, Hkv, P, D]
            vs.append(v)
            o = self._prefill_attend(q, k, v, attn)  # [U, H, P, D]
            o = o.transpose(1, 2).reshape(U * P, H * D).index_select(0, real)  # [N, H*D]
            x = x + F.linear(o, lw[3], lw[4])
            x = x + self._mlp(_rms_norm(x, lw[5], self.eps), lw)
        logits = F.linear(_rms_norm(x[last], self._weights[1], self.eps), self._weights[2]).float()  # [U, V]

        B = U * repeat
        # one [B, Hkv, T, D] tensor per layer: a compiled step then mutates graph inputs directly
        # (a slice of one big cache tensor makes inductor copy the whole slice every step). The
        # reduce form keeps keys as [B, Hkv, D, T] (see _attend)
        shape = (B, Hkv, total_len, D)
        kshape = (B, Hkv, D, total_len) if self.reduce_attention else shape
        self.k_cache = [torch.zeros(kshape, dtype=self.dtype, device=ids.device) for _ in range(L)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=ids.device) for _ in range(L)]
        for li in range(L):
            k = ks[li].repeat_interleave(repeat, dim=0)
            if self.reduce_attention:
                self.k_cache[li][..., :P] = k.transpose(2, 3)
            else:
                self.k_cache[li][:, :, :P] = k
            self.v_cache[li][:, :, :P] = vs[li].repeat_interleave(repeat, dim=0)
        # valid[b, t]: slot t holds a real token of row b (future slots open as they are written)
        self.valid = torch.zeros(B, total_len, dtype=torch.bool, device=ids.device)
        self.valid[:, :P] = mask.repeat_interleave(repeat, dim=0)
        self.pos = pos[:, -1].repeat_interleave(repeat) + 1  # [B] position of the next token
        self.t = P  # next cache slot
        return logits.repeat_interleave(repeat, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] long); returns next-token logits [B, V] fp32."""
        if self.t >= self.valid.shape[1]:
            raise ModelError("the KV cache is full", fix="prefill with a larger total_len")
        self.valid[:, self.t] = True
        slot = torch.tensor([self.t], device=tokens.device)
        cos_t, sin_t = self._rope_table(int(self.valid.shape[1]))
        fn = self._decode_step
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._decode_step, dynamic=False)
            fn = self._compiled
        logits = fn(self._weights, tokens, self.pos, slot, self.k_cache, self.v_cache, self.valid, cos_t, sin_t)
        self.pos = self.pos + 1
        self.t += 1
        return logits

    def _decode_step(self, w, tok, pos, slot, kc, vc, valid, cos_t, sin_t):
        # tok, pos: [B]; slot: [1] cache index; kc, vc: L tensors [B, Hkv, T, D] (written in place);
        # valid: [B, T] bool; cos_t, sin_t: [N, D]. Returns logits [B, V] fp32.
        B, H, Hkv, D = tok.shape[0], self.n_heads, self.n_kv, self.head_dim
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]  # [B, 1, D]
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=tok.device).masked_fill(~valid, float("-inf"))
        bias = bias[:, None, None, :]  # [B, 1, 1, T]
        x = F.embedding(tok, w[0])  # [B, hidden]
        for li in range(len(kc)):
            lw = w[3 + self._PER_LAYER * li: 3 + self._PER_LAYER * (li + 1)]
            h = _rms_norm(x, lw[0], self.eps)
            qkv = F.linear(h, lw[1], lw[2]).view(B, H + 2 * Hkv, D)
            qk = _rope(qkv[:, :H + Hkv], cos, sin)
            q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)  # query head h = kv_head * G + g, as repeat_kv orders them
            if self.reduce_attention:
                kc[li].index_copy_(3, slot, qk[:, H:, :, None])  # [B, Hkv, D, 1] into slot t
            else:
                kc[li].index_copy_(2, slot, qk[:, H:, None])  # [B, Hkv, 1, D] into slot t
            vc[li].index_copy_(2, slot, qkv[:, H + Hkv:, None])
            o = self._attend(q, kc[li], vc[li], bias).reshape(B, H * D)  # [B, Hkv, G, D] -> [B, H*D]
            x = x + F.linear(o, lw[3], lw[4])
            x = x + self._mlp(_rms_norm(x, lw[5], self.eps), lw)
        return F.linear(_rms_norm(x, w[1], self.eps), w[2]).float()

    def _prefill_attend(self, q, k, v, attn):
        # q [U, H, P, D], k/v [U, Hkv, P, D], attn [U, 1, P, P] bool -> [U, H, P, D]
        if self.dtype == torch.float32:  # K/V repeated per query group, as HF's sdpa path does
            G = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                  attn_mask=attn, scale=q.shape[-1] ** -0.5)
        # Low precision: two batched matmuls with each KV head's query group stacked, softmax in fp32.
        # SDPA's fused CPU kernel takes 2.5x as long on short prompts (64 x 24 tokens, bf16)
        U, H, P, D = q.shape
        Hkv = k.shape[1]
        s = torch.matmul(q.reshape(U, Hkv, H // Hkv * P, D), k.transpose(-1, -2)).view(U, Hkv, -1, P, P)
        s = s.float().mul_(D ** -0.5).masked_fill_(~attn[:, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1).to(q.dtype).view(U, Hkv, -1, P)
        return torch.matmul(p, v).view(U, H, P, D)

    def _attend(self, q, k, v, bias):
        # q [B, Hkv, G, D], v [B, Hkv, T, D], k the same or [B, Hkv, D, T] (reduce_attention),
        # bias [B, 1, 1, T] -> [B, Hkv, G, D]
        D = q.shape[-1]
        if not self.reduce_attention:
            s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5 + bias  # [B, Hkv, G, T]
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(p, v)
        # The same sums as broadcast products: inductor fuses each into one loop in fp32, where a
        # batched matmul of [G, D] x [D, T] pieces costs ~50 us of call overhead in bf16 on CPU. Keys
        # as [D, T] let the q.k loop run along T in vector lanes, accumulating over D, instead of one
        # horizontal sum of D lanes per score (attention 30-40% faster at 64 rows)
        s = (q[..., None].float() * k[:, :, None].float()).sum(-2) * D ** -0.5 + bias  # [B, Hkv, G, T]
        p = torch.softmax(s, dim=-1)
        return (p[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype)
