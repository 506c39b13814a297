"""The shared base of the self-attention processors that mirror each family's diffusers processor.

Each family module (``vidsparse.families.<name>``) defines its processor on this base; each
computes projections, norms and RoPE exactly as the model's own processor
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

from typing import TYPE_CHECKING, Any

import torch

from vidsparse.layout import VideoLayout

if TYPE_CHECKING:
    from vidsparse.pipelines.hooks import SparseState


class WrappedProcessor:
    """A processor standing in for a diffusers one: the original processor, the layer index and
    the owner's state. ``_attention_backend`` / ``_parallel_config`` read and write through to the
    original, so ``set_attention_backend`` and ``enable_parallelism`` keep working on a patched
    model (vidsparse's sparse processors and FreeSwim's dual-path processors share this)."""

    def __init__(self, original: Any, layer: int, state: Any) -> None:
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, original={type(self.original).__name__})"


class SparseProcessor(WrappedProcessor):
    """Common part of the families' sparse self-attention processors: the original processor,
    the layer index and the transformer's ``SparseState``."""

    state: SparseState

    def _dense(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # a counter in a graph would be guarded on (recompiles)
            self.state.calls["dense"] += 1
        return self.original(*args, **kwargs)

    def _dense_any_order(
        self, attn, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask, rotary, rotary_dim: int = 1
    ) -> torch.Tensor:
        """The model's own attention, also in a forward that runs in kernel order (a dense layer
        of a sparse forward): there it sees the caller's tokens, so no padding row is among its
        keys, and its output goes back to kernel order. ``rotary``: the processor's RoPE tables
        (cut at the shard plan's ``outputs``), tokens along ``rotary_dim``, or None."""
        order = self.state.current.order
        if order is None:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary)
        if rotary is not None:
            rotary = tuple(order.to_caller(t, rotary_dim) for t in rotary)
        out = self._dense(attn, order.to_caller(hidden_states), encoder_hidden_states, attention_mask, rotary)
        return order.to_kernel(out)

    def _layout(self, seq_len: int, text_len: int, position: str) -> VideoLayout:
        """The call's layout, checked against this attention's token count (the padded kernel
        sequence when the forward runs in kernel order)."""
        layout = self.state.current.layout
        order = self.state.current.order
        if order is not None and seq_len == order.padded_len and text_len == layout.text_len:
            return layout
        seq_len = seq_len * self.state.ulysses  # diffusers' Ulysses: this rank holds 1/N of the rows
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


#: Module names of a joint-attention block's two streams: (q, k, v projections, q, k norms).
_STREAMS = {
    "video": ("to_q", "to_k", "to_v", "norm_q", "norm_k"),
    "text": ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"),
}


def project_qkv(attn, hidden_states: torch.Tensor, stream: str = "video") -> tuple[torch.Tensor, ...]:
    """q, k, v [B, S, H, D] of one stream of a diffusers joint-attention block (HunyuanVideo, Mochi).

    ``stream="video"``: ``to_q/k/v`` then the optional per-head ``norm_q`` / ``norm_k``;
    ``stream="text"``: ``add_q/k/v_proj`` then ``norm_added_q`` / ``norm_added_k``.
    """
    q_proj, k_proj, v_proj, q_norm, k_norm = _STREAMS[stream]
    query, key, value = (
        getattr(attn, n)(hidden_states).unflatten(2, (attn.heads, -1)) for n in (q_proj, k_proj, v_proj)
    )
    if getattr(attn, q_norm) is not None:
        query = getattr(attn, q_norm)(query)
    if getattr(attn, k_norm) is not None:
        key = getattr(attn, k_norm)(key)
    return query, key, value


__all__ = ["SparseProcessor", "project_qkv"]
