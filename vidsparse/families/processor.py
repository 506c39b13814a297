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

from vidsparse.layout import VideoLayout

if TYPE_CHECKING:
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


__all__ = ["SparseProcessor"]
