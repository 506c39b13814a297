"""Text conditioning shared by the HunyuanVideo, LTX-Video and Mochi LoRA adapters.

A pipeline without text encoders (``text_encoder=None``, as the tiny test pipelines) gets the
deterministic hashed embeddings of ``vidsparse.models.tiny.encode_prompt_tiny`` instead, with a
padding mask of one token per word (+1), so offline runs and tests exercise the masks.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vidsparse.lora.adapters.base import module_fingerprint


def tiny_text(caption: str, seq_len: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed stand-in embeddings [seq_len, dim] and a bool padding mask [seq_len] for ``caption``."""
    from vidsparse.models.tiny import encode_prompt_tiny

    emb = encode_prompt_tiny(caption, seq_len=seq_len, dim=dim)[0]
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[: min(seq_len, 1 + len(caption.split()))] = True
    return emb, mask


def tiny_text_identity(dim: int, family: str) -> str:
    """Cache identity of ``tiny_text`` embeddings of width ``dim`` (no encoder weights to hash)."""
    from vidsparse.models.tiny import TINY_TEXT_LEN

    extra = {"encoder": "vidsparse.lora.adapters.text.tiny_text", "dim": dim, "len": TINY_TEXT_LEN, "family": family}
    return module_fingerprint(None, extra)


class TextEncodersMixin:
    """Text identity and the tiny (no text encoder) switch shared by the three families."""

    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    max_sequence_length: ClassVar[int] = 256

    @property
    def tiny_text(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is None  # type: ignore[attr-defined]

    def _text_dim(self) -> int:
        cfg = self.transformer.config  # type: ignore[attr-defined]
        return int(cfg.get("text_embed_dim") or cfg.get("caption_channels"))

    def _compute_text_identity(self) -> str:
        pipe = self.pipe  # type: ignore[attr-defined]
        if self.tiny_text:
            return tiny_text_identity(self._text_dim(), self.family)  # type: ignore[attr-defined]
        parts = {}
        for name in self.text_encoder_names:
            tok = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
            parts[name] = {
                "tokenizer": type(tok).__name__,
                "vocab": getattr(tok, "vocab_size", None),
                "encoder": module_fingerprint(getattr(pipe, name, None)),
            }
        return module_fingerprint(
            None,
            {
                "family": self.family,
                "max_len": self.max_sequence_length,  # type: ignore[attr-defined]
                "encoders": parts,
            },
        )

    def _text_device(self) -> torch.device:
        device = torch.device("cpu")
        for name in self.text_encoder_names:
            module = getattr(self.pipe, name, None)  # type: ignore[attr-defined]
            if module is not None:
                device = next(self._ready(module).parameters()).device  # type: ignore[attr-defined]
        return device


class T5TextMixin(TextEncodersMixin):
    """T5 prompt embeddings + attention mask, as LTX-Video's and Mochi's pipelines encode them."""

    @torch.no_grad()
    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        if self.tiny_text:
            from vidsparse.models import tiny

            emb, mask = tiny_text(caption, tiny.TINY_TEXT_LEN, self._text_dim())
        else:
            emb, mask, _, _ = self.pipe.encode_prompt(
                prompt=[caption],
                do_classifier_free_guidance=False,
                num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
                device=self._text_device(),
            )
            emb, mask = emb[0], mask[0].bool()
        return {"prompt_embeds": emb.detach().float().cpu(), "prompt_attention_mask": mask.cpu()}
