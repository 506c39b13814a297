"""Rank side of tests/test_parallel_three_ranks.py's end-to-end run: every family's tiny pipeline
through ``run_parallel`` (clip mode, per-clip VAE decode with full context) on each rank."""

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
}


def _call_kwargs(family, pipe, frames: int, size: int) -> dict[str, Any]:
    from vidsparse.models.tiny import encode_prompt_tiny

    kwargs: dict[str, Any] = dict(num_frames=frames, height=size, width=size, num_inference_steps=2,
                                  guidance_scale=5.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    if family.tiny_prompt_kwargs is not None:
        kwargs.update(family.tiny_prompt_kwargs(pipe, "a tiny cat", ""))
    else:  # Wan: prompts hashed into embeddings of the transformer's text_dim
        dim = pipe.transformer.config.text_dim
        kwargs.update(prompt_embeds=encode_prompt_tiny("a tiny cat", dim=dim),
                      negative_prompt_embeds=encode_prompt_tiny("", dim=dim))  # fmt: skip
    return kwargs


class _ForwardLog:
    """Every transformer forward's (layout, batch): what the estimator needs to predict the bytes."""

    def __init__(self, family, model) -> None:
        self.family, self.calls = family, []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs) -> None:
        import vidsparse as vs

        text = self.family.text_len(module, kwargs)
        position = self.family.text_position if text else "none"
        layout = vs.VideoLayout(*self.family.grid(module, kwargs), text_len=text, text_position=position)
        self.calls.append((layout, kwargs["hidden_states"].shape[0]))


def pipelines_suite(cases: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per family: the video rank 0 assembles against the single-process video, the bytes each rank
    sent in the denoising loop against ``estimate.forward_bytes`` summed over the transformer's
    forwards, and the decoded frames each rank sent to rank 0."""
    torch.set_num_threads(1)
    import vidsparse as vs
    import vidsparse.pipelines as vsp
    from vidsparse.families import get_family
    from vidsparse.parallel import init_distributed
    from vidsparse.parallel.estimate import forward_bytes
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
                ref = pipe(**_call_kwargs(family, pipe, frames, size), output_type="np").frames
            vsp.remove(pipe)
        model = pipe.transformer
        log = _ForwardLog(family, model)
        try:
            with torch.no_grad():
                out = run_parallel(pipe, _call_kwargs(family, pipe, frames, size), cfg, "clip", rt, vae_overlap=None)
        finally:
            log.handle.remove()
        heads = family.attention_paths(model)[0][1].heads
        predicted = sum(
            forward_bytes("clip", layout, pattern, heads, model.config.attention_head_dim, family.num_layers(model),
                          rt.world_size, model.proj_out.out_features, element_size=4, batch=batch)[rt.rank]
            for layout, batch in log.calls
        )  # fmt: skip
        counts = pixel_counts(pipe.vae, (frames - 1) // family.geometry.temporal + 1, rt.world_size)
        row.update(sent=out.comm["total_bytes"], predicted=predicted, forwards=len(log.calls), counts=counts,
                   decode_bytes=out.decode_bytes, decode_predicted=0 if rt.rank == 0 else counts[rt.rank] * 3 * size * size * 4,
                   video_is_none=out.video is None)  # fmt: skip
        if rt.is_main:
            row.update(video_err=float(abs(out.video - ref).max()), shape=tuple(out.video.shape), ref_shape=ref.shape)
        res[name] = row
    return res
