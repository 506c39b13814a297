"""HunyuanVideo image-to-video LoRA (``HunyuanVideoImageToVideoPipeline``): the first frame through LLaVA and the latents.

The tiny ``HunyuanVideoImageToVideoPipeline`` of the family record (``tiny-hunyuan-i2v``:
``token_replace``; ``tiny-hunyuan-i2v-concat``: ``latent_concat``) has a real, tiny text path: a
LLaVA (3-layer Llama, CLIP vision tower with the checkpoint's 576 image tokens), a CLIP text model
and a Llama-3-style tokenizer under which the prompt template has the offsets the pipeline
hard-codes. Oracle: the real pipeline's ``__call__`` with ``image=`` the clip's first frame and
``prompt=`` its caption, its transformer calls recorded. Checked: the tokenizer reproduces
``DEFAULT_PROMPT_TEMPLATE``'s offsets; the prompt embeddings, mask, pooled embedding and image
latents the trainer caches are what the pipeline feeds the transformer; an ideal model of the
trained objective put into the real sampler reaches the clip's latents; ``predict`` makes the
pipeline's transformer call; the loss covers the frames the pipeline steps; then ``train-lora
--model tiny-hunyuan-i2v`` and ``generate --image`` end to end.
"""

import json

import pytest
import torch
from lora_checks import pipeline_calls, square_clip_8bit

from vidsparse.families.hunyuan import tiny_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

SPEC = ClipSpec(9, 32, 32)  # 3 latent frames of 4 x 4 latents (2 x 2 tokens)
CAPTION = "a red square moves right"


@pytest.fixture(scope="module", params=["hunyuan-i2v", "hunyuan-i2v-concat"])
def hunyuan(request):
    pipe = tiny_pipeline(variant=request.param)
    adapter = adapter_for(pipe, f"tiny-{request.param}")
    adapter.validate_clip(SPEC)
    clip = square_clip_8bit(SPEC)
    enc = adapter.encode_clip(clip, captions=[CAPTION])
    text = {**collate_text([adapter.encode_text(CAPTION)]), **{k: v for k, v in enc.items() if k != "latents"}}
    return pipe, adapter, clip, enc["latents"], text


def test_tokenizer_has_the_templates_offsets():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE as T

    from vidsparse.families.hunyuan import tiny_i2v_tokenizer

    tok = tiny_i2v_tokenizer()
    prefix = tok(T["template"].split("{}")[0]).input_ids
    assert len(prefix) == T["crop_start"] and prefix.index(tok.convert_tokens_to_ids("<image>")) == T["image_emb_start"]
    whole = tok.convert_ids_to_tokens(tok(T["template"].format(CAPTION)).input_ids)
    assert whole[-5:] == ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]
    assert tok.decode(tok(CAPTION).input_ids, skip_special_tokens=True) == CAPTION  # any text: bytes


def _run(pipe, clip, latents, output=None, steps=3):
    return pipeline_calls(pipe.transformer, lambda: pipe(
        image=first_frame_image(clip[0]), prompt=CAPTION, num_frames=SPEC.num_frames, height=SPEC.height,
        width=SPEC.width, num_inference_steps=steps, latents=latents, output_type="latent", return_dict=False,
    )[0], output)  # fmt: skip


def test_condition_is_the_pipelines(hunyuan):
    pipe, adapter, clip, x0, text = hunyuan
    _, calls = _run(pipe, clip, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), steps=2)
    c = x0.shape[1]
    image = text["image_latents"]
    for call in calls:
        torch.testing.assert_close(call["encoder_hidden_states"], text["prompt_embeds"], rtol=0, atol=0)
        torch.testing.assert_close(call["encoder_attention_mask"], text["prompt_attention_mask"], rtol=0, atol=0)
        torch.testing.assert_close(call["pooled_projections"], text["pooled_prompt_embeds"], rtol=0, atol=0)
        hidden = call["hidden_states"]
        if adapter.image_condition_type == "token_replace":
            torch.testing.assert_close(hidden[:, :, :1], image, rtol=0, atol=0)
        else:
            assert hidden.shape[1] == 2 * c + 1
            torch.testing.assert_close(hidden[:, c : 2 * c, :1], image, rtol=0, atol=0)
            assert not bool(hidden[:, c : 2 * c, 1:].any())
            assert bool((hidden[:, -1, 0] == 1).all()) and not bool(hidden[:, -1, 1:].any())
    # 576 image tokens kept 1 in 4 (token_replace) or 1 in 2 (latent_concat), then the caption's
    n_image = 576 // adapter.image_embed_interleave
    assert bool((text["prompt_attention_mask"][0, :n_image] == 1).all())
    assert int(text["prompt_attention_mask"].sum()) > n_image  # and the caption's tokens
    # the image latents are the first frame's alone (the VAE's GroupNorm sees one frame), times scaling_factor
    with torch.no_grad():
        z = pipe.vae.encode(clip[:, :, :1]).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(image, z, rtol=1e-5, atol=1e-5)


def test_ideal_model_reaches_the_clip_and_predict_is_the_pipelines_call(hunyuan):
    pipe, adapter, clip, x0, text = hunyuan
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    start = 0.999 * noise + 0.001 * text["image_latents"]  # prepare_latents' first latents
    final, calls = _run(pipe, clip, noise, output=start - x0)
    concat = adapter.image_condition_type == "latent_concat"
    if concat:  # the pipeline returns latent frames 1 onwards
        torch.testing.assert_close(final, x0[:, :, 1:], rtol=0, atol=2e-4)
    else:
        torch.testing.assert_close(final[:, :, 1:], x0[:, :, 1:], rtol=0, atol=2e-4)
        torch.testing.assert_close(final[:, :, :1], text["image_latents"], rtol=0, atol=0)
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(kw), with_kwargs=True)
    c = x0.shape[1]
    try:
        for call in calls:
            noisy = call["hidden_states"][:, :c].float()
            s = float(call["timestep"][0]) / 1000
            frames = slice(0, None) if concat else slice(1, None)
            path = x0 + s * (start - x0)
            torch.testing.assert_close(noisy[:, :, frames], path[:, :, frames], rtol=0, atol=2e-4)  # on the path
            with torch.no_grad():
                adapter.predict(pipe.transformer, noisy, adapter.transformer_timestep(torch.tensor([s])), text)
            got = seen[-1]
            for key in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections"):
                torch.testing.assert_close(got[key], call[key], rtol=0, atol=1e-6)
            torch.testing.assert_close(got["timestep"].float(), call["timestep"].float(), rtol=0, atol=0.05)
            assert (got["guidance"] is None) == (call["guidance"] is None)
            if call["guidance"] is not None:  # the pipeline's default guidance_scale 1.0, the trainer's g = 1
                torch.testing.assert_close(got["guidance"], call["guidance"])
    finally:
        handle.remove()
    pred = torch.zeros_like(x0)
    pred[:, :, 0] = 3.0
    assert (float(adapter.loss(pred, torch.zeros_like(x0), text)) == 0.0) != concat  # token_replace: not trained


def test_condition_needs_the_caption_and_the_text_path():
    pipe = tiny_pipeline(variant="hunyuan-i2v")
    adapter = adapter_for(pipe, "tiny-hunyuan-i2v")
    with pytest.raises(ValueError, match="needs one caption per clip"):
        adapter.encode_clip(square_clip_8bit(SPEC))
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="needs the pipeline's text_encoder"):
        adapter_for(pipe, "tiny-hunyuan-i2v")


def test_train_then_generate_end_to_end(tmp_path):
    from test_lora_data import make_dataset

    from vidsparse.cli import main

    out = tmp_path / "out"
    rc = main(["train-lora", "--model", "tiny-hunyuan-i2v", "--data-dir", str(make_dataset(tmp_path / "data")),
               "--output-dir", str(out), "--num-frames", "9", "--height", "32", "--width", "32", "--rank", "4",
               "--max-train-steps", "2", "--mixed-precision", "no", "--pattern", "radial", "--attention-backend",
               "torch", "--no-progress"])  # fmt: skip
    assert rc in (0, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    first_frame_image(square_clip_8bit(SPEC)[0]).save(tmp_path / "first.png")
    video = tmp_path / "v.gif"
    rc = main(["generate", "--model", "tiny-hunyuan-i2v", "--image", str(tmp_path / "first.png"), "--lora", str(out),
               "--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--pattern", "radial",
               "--backend", "torch", "--out", str(video)])  # fmt: skip
    assert rc in (0, None) and video.is_file() and video.stat().st_size > 0
