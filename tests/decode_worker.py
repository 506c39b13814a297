"""Rank side of tests/test_parallel_three_ranks.py's end-to-end run: every family's tiny pipeline
through ``run_parallel`` (clip mode, per-clip VAE decode with full context) on each rank; LTX-2's
audio decoded on rank 0 only."""

from __future__ import annotations

from typing import Any

import torch

#: family -> (pixel frames, height = width): 7 latent frames each (HunyuanVideo: 3 temporal tiles;
#: CogVideoX: decode batches [0, 3) [3, 5) [5, 7), cut exactly where 3 ranks' clips start).
PIPELINE_CASES = {
    "wan": (25, 32),
    "hunyuan": (25, 32),
    "cogvideox": (25, 32),
    "mochi": (37, 16),
    "ltx": (49, 64),
    "ltx2": (49, 64),  # and its audio, decoded on rank 0 only
}


def _call_kwargs(family, pipe, frames: int, size: int) -> dict[str, Any]:
    from vidsparse.models.tiny import encode_prompt_tiny

    kwargs: dict[str, Any] = dict(num_frames=frames, height=size, width=size, num_inference_steps=2,
                                  guidance_scale=5.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    if family.tiny_prompt_kwargs is not None:
        kwargs.update(family.tiny_prompt_kwargs(pipe, "a tiny cat", ""))
    elif getattr(pipe, "tokenizer", None) is not None:  # LTX-2: its tiny tokenizer and Gemma-3 encoder
        kwargs.update(prompt="a tiny cat", negative_prompt="", max_sequence_length=32)
    else:  # Wan: prompts hashed into embeddings of the transformer's text_dim
        dim = pipe.transformer.config.text_dim
        kwargs.update(prompt_embeds=encode_prompt_tiny("a tiny cat", dim=dim),
                      negative_prompt_embeds=encode_prompt_tiny("", dim=dim))  # fmt: skip
    return kwargs


class _ForwardLog:
    """The estimator's bytes of every transformer forward (``verify.forward_estimate``), per rank."""

    def __init__(self, model, pattern, world_size: int) -> None:
        self.pattern, self.world_size, self.calls = pattern, world_size, []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs) -> None:
        from vidsparse.parallel.verify import forward_estimate

        self.calls.append(forward_estimate(module, kwargs, self.pattern, "clip", self.world_size))


def pipelines_suite(cases: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per family: the video rank 0 assembles against the single-process video, the bytes each rank
    sent in the denoising loop against ``estimate.forward_bytes`` summed over the transformer's
    forwards, and the decoded frames each rank sent to rank 0."""
    torch.set_num_threads(1)
    import vidsparse as vs
    import vidsparse.pipelines as vsp
    from vidsparse.families import get_family
    from vidsparse.parallel import init_distributed
    from vidsparse.parallel.pipeline import run_parallel
    from vidsparse.parallel.vae import pixel_counts

    rt = init_distributed(timeout_s=240)
    pattern = vs.DualScope(local_frames=1, global_stride=3)
    cfg = vs.SparseConfig(pattern, dense_first_steps=0, dense_layers=(), backend="torch", block_size=16)
    res: dict[str, Any] = {}
    for name, (frames, size) in PIPELINE_CASES.items():
        if cases is not None and name not in cases:
            continue
        family = get_family(name)
        pipe = family.tiny_pipeline(seed=0)
        row: dict[str, Any] = {}
        if rt.is_main:  # the single-process reference (the other ranks wait at the first collective)
            vsp.apply(pipe, cfg)
            with torch.no_grad():
                ref_out = pipe(**_call_kwargs(family, pipe, frames, size), output_type="np")
            ref, ref_audio = ref_out.frames, getattr(ref_out, "audio", None)
            vsp.remove(pipe)
        log = _ForwardLog(pipe.transformer, pattern, rt.world_size)
        audio_decodes: list[int] = []  # LTX-2: the audio VAE's decoder runs on rank 0 only
        audio_vae = getattr(pipe, "audio_vae", None)
        hook = (
            audio_vae.decoder.register_forward_pre_hook(lambda *a, seen=audio_decodes: seen.append(1))
            if audio_vae
            else None
        )
        try:
            with torch.no_grad():
                out = run_parallel(pipe, _call_kwargs(family, pipe, frames, size), cfg, "clip", rt, vae_overlap=None)
        finally:
            log.handle.remove()
            if hook is not None:
                hook.remove()
        row["audio_decodes"] = len(audio_decodes)
        predicted = sum(per_rank[rt.rank] for per_rank in log.calls)
        counts = pixel_counts(pipe.vae, (frames - 1) // family.geometry.temporal + 1, rt.world_size)
        row.update(sent=out.comm["total_bytes"], predicted=predicted, forwards=len(log.calls), counts=counts,
                   decode_bytes=out.decode_bytes, decode_predicted=0 if rt.rank == 0 else counts[rt.rank] * 3 * size * size * 4,
                   video_is_none=out.video is None)  # fmt: skip
        row["audio_is_none"] = out.audio is None
        if rt.is_main:
            row.update(video_err=float(abs(out.video - ref).max()), shape=tuple(out.video.shape), ref_shape=ref.shape)
            if ref_audio is not None:
                row["audio_err"] = float((out.audio.double() - ref_audio.double()).abs().max())
        res[name] = row
    return res
