"""Self-attention processors that mirror each family's diffusers processor.

Each processor computes projections, norms and RoPE exactly as the model's own processor
(diffusers 0.42: ``WanAttnProcessor``, ``HunyuanVideoAttnProcessor2_0``,
``CogVideoXAttnProcessor2_0`` / ``FusedCogVideoXAttnProcessor2_0``, ``LTXVideoAttnProcessor``,
``MochiAttnProcessor2_0``); only the core attention call changes, to
``state.attend`` -> ``state.attention_fn`` (``vidsparse.attention``) on q/k/v [B, S, H, D].
Dense steps and layers, and any call this mirror does not cover (an explicit attention mask
where the model never passes one, an unparseable mask), call the original processor object,
so they are the model's own dense path, bit for bit.

``_attention_backend`` / ``_parallel_config`` read and write through to the original processor,
so ``set_attention_backend`` and ``enable_parallelism`` keep working on a patched model.
"""

from __future__ import annotations

from typing import Any

import torch

from vidsparse.layout import VideoLayout
from vidsparse.pipelines.hooks import SparseState


class SparseProcessor:
    """Common part: the original processor, the layer index and the transformer's state."""

    def __init__(self, original: Any, layer: int, state: SparseState) -> None:
        self.original = original
        self.layer = layer
        self.state = state

    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:
        self.original._parallel_config = value

    def _dense(self, *args, **kwargs):
        self.state.calls["dense"] += 1
        return self.original(*args, **kwargs)

    def _layout(self, seq_len: int, text_len: int, position: str) -> VideoLayout:
        """The call's layout, checked against this attention's token count."""
        layout = self.state.current.layout
        if layout.text_len != text_len or layout.seq_len != seq_len:
            grid_layout = VideoLayout(*layout.grid, text_len=text_len, text_position=position if text_len else "none")
            if grid_layout.seq_len != seq_len:
                raise ValueError(
                    f"vidsparse: layer {self.layer} attends {seq_len} tokens, but the transformer call has "
                    f"a {layout.frames}x{layout.height}x{layout.width} grid + {text_len} text tokens = "
                    f"{grid_layout.seq_len}. The layout discovery does not fit this model; replace "
                    "state.discover_layout (see vidsparse.pipelines.hooks)."
                )
            return grid_layout
        return layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, original={type(self.original).__name__})"


# -- Wan -------------------------------------------------------------------------------------
def _wan_qkv(attn, hidden_states: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseProcessor(SparseProcessor):
    """``WanAttnProcessor`` for self-attention (``attn1``): video tokens only."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or attention_mask is not None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _wan_qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rope(query, *rotary_emb)
            key = _wan_rope(key, *rotary_emb)
        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- HunyuanVideo ----------------------------------------------------------------------------
def _hunyuan_text_mask(mask: torch.Tensor | None, batch: int, seq: int, text_len: int) -> torch.Tensor | bool | None:
    """Key validity of the text tail from the model's [B, 1, 1, S] bool mask (False: unusable)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.numel() != batch * seq or mask.dim() not in (2, 4):
        return False
    return mask.reshape(batch, seq)[:, seq - text_len :]


class HunyuanSparseProcessor(SparseProcessor):
    """``HunyuanVideoAttnProcessor2_0``: joint [video; text] attention, text padding mask."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        batch = hidden_states.shape[0]
        seq = hidden_states.shape[1] + text_len
        text_mask = _hunyuan_text_mask(attention_mask, batch, seq, text_len)
        if text_mask is False:
            self.state.warn_once("hunyuan-mask", "vidsparse: unexpected HunyuanVideo attention mask; running dense.")
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        single = attn.add_q_proj is None  # single-stream blocks project text and video together
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1), query[:, -text_len:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1), key[:, -text_len:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if not single:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        layout = self._layout(query.shape[1], text_len, "after")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, text_mask)
        out = out.flatten(2, 3).to(query.dtype)

        out, encoder_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


# -- CogVideoX -------------------------------------------------------------------------------
class CogVideoXSparseProcessor(SparseProcessor):
    """``CogVideoXAttnProcessor2_0`` (and the fused variant): joint [text; video] attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or attention_mask is not None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = hidden_states.shape
        if type(self.original).__name__.startswith("Fused"):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
        layout = self._layout(seq, text_len, "before")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out


# -- LTX-Video -------------------------------------------------------------------------------
class LTXSparseProcessor(SparseProcessor):
    """``LTXVideoAttnProcessor`` for self-attention (``attn1``): RoPE before the head split."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pattern = self.state.pattern_for(self.layer)
        if pattern is None or encoder_hidden_states is not None or attention_mask is not None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        layout = self._layout(query.shape[1], 0, "none")
        out = self.state.attend(query, key, value, layout, pattern, self.layer, None)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- Mochi -----------------------------------------------------------------------------------
def _mochi_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def _mochi_pack_text(text_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mochi's per-sample loop keeps only valid text tokens and right-pads the output with
    zeros: valid rows move to the front (in order), the rest are zero."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    packed = text_out.gather(1, order[:, :, None, None].expand_as(text_out))
    keep = torch.arange(valid.shape[1], device=valid.device)[None, :] < valid.sum(dim=1, keepdim=True)
    return torch.where(keep[:, :, None, None], packed, torch.zeros((), dtype=packed.dtype, device=packed.device))


class MochiSparseProcessor(SparseProcessor):
    """``MochiAttnProcessor2_0``: joint [video; valid text] attention, per-sample text validity."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        pattern = self.state.pattern_for(self.layer)
        if pattern is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)
        if image_rotary_emb is not None:
            query = _mochi_rope(query, *image_rotary_emb)
            key = _mochi_rope(key, *image_rotary_emb)

        video_len, text_len = query.shape[1], encoder_query.shape[1]
        valid = attention_mask.to(torch.bool)
        q = torch.cat([query, encoder_query], dim=1)
        k = torch.cat([key, encoder_key], dim=1)
        v = torch.cat([value, encoder_value], dim=1)
        layout = self._layout(video_len + text_len, text_len, "after")
        out = self.state.attend(q, k, v, layout, pattern, self.layer, valid)
        out = torch.cat([out[:, :video_len], _mochi_pack_text(out[:, video_len:], valid)], dim=1)
        out = out.flatten(2, 3)
        out, encoder_out = out.split_with_sizes((video_len, text_len), dim=1)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if hasattr(attn, "to_add_out"):
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


PROCESSORS: dict[str, type[SparseProcessor]] = {
    "wan": WanSparseProcessor,
    "hunyuan": HunyuanSparseProcessor,
    "cogvideox": CogVideoXSparseProcessor,
    "ltx": LTXSparseProcessor,
    "mochi": MochiSparseProcessor,
}
