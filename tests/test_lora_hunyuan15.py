"""HunyuanVideo 1.5 LoRA (``vidsparse.lora.adapters.hunyuan15``): every input as its pipelines build it.

Checked on the family record's tiny pipelines (real ``HunyuanVideo15Pipeline`` /
``HunyuanVideo15ImageToVideoPipeline`` with tiny Qwen2.5-VL, ByT5 and SigLIP encoders, the
``ClassifierFreeGuidance`` guider at 6 and a flow-matching Euler scheduler, shift 5): an ideal
model of the trained flow objective, put into the real pipeline's sampler (both guider branches),
carries the noise to the clip's latents; each conditional call's inputs (Qwen + ByT5 embeddings
and masks, condition-latent and mask channels, SigLIP slots, timestep) are exactly what
``adapter.predict`` feeds the transformer at that noise level; the unconditional branch is the
empty caption's encoding. Then ``train_lora`` followed by ``generate --lora`` on
``tiny-hunyuan15`` and ``tiny-hunyuan15-i2v``.
"""

import pytest
import torch
from lora_checks import (
    check_on_flow_path,
    generate_tiny,
    lora_module_names,
    pipeline_calls,
    predict_inputs,
    stepping_square_8bit,
    train_tiny,
)

from vidsparse.families.hunyuan15 import tiny_pipeline
from vidsparse.lora.adapters.wan_i2v import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

SPECS = {"hunyuan15": ClipSpec(9, 32, 48), "hunyuan15-i2v": ClipSpec(9, 48, 64)}  # I2V: a 64-pixel bucket
CAPTION = 'a sign reading "OPEN"'  # quoted text: the ByT5 glyph encoder runs (its mask is not all zero)


@pytest.mark.parametrize("variant", ["hunyuan15", "hunyuan15-i2v"])
def test_ideal_model_in_the_real_sampler_reaches_the_clip(variant):
    pipe = tiny_pipeline(variant=variant)
    adapter = adapter_for(pipe, f"tiny-{variant}")
    assert adapter.default_flow_shift() == pipe.scheduler.config.shift == 5.0
    spec = SPECS[variant]
    adapter.validate_clip(spec)
    clip = stepping_square_8bit(spec)
    enc = adapter.encode_clip(clip)
    x0 = enc["latents"]
    cond = {k: v for k, v in enc.items() if k != "latents"}
    text = {**collate_text([adapter.encode_text(CAPTION)]), **cond}
    empty = collate_text([adapter.encode_text("")])
    assert text["prompt_embeds_mask_2"].any() and not empty["prompt_embeds_mask_2"].any()
    assert not text["prompt_embeds_mask"].all() or not empty["prompt_embeds_mask"].all()  # padding exercised
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    kwargs = (
        dict(image=first_frame_image(clip[0]))
        if variant.endswith("i2v")
        else dict(height=spec.height, width=spec.width)
    )
    final, calls = pipeline_calls(pipe.transformer, lambda: pipe(
        prompt=CAPTION, num_frames=spec.num_frames, num_inference_steps=4, latents=noise.clone(),
        output_type="latent", return_dict=False, **kwargs,
    )[0], adapter.transformer_output(noise - x0), tensors_only=True)  # fmt: skip
    torch.testing.assert_close(final.float(), x0, rtol=0, atol=2e-4)
    assert len(calls) == 8  # the guider's conditional then unconditional call, each of 4 steps
    z = x0.shape[1]
    for step in range(4):
        call, uncond = calls[2 * step], calls[2 * step + 1]
        check_on_flow_path(adapter, call["hidden_states"][:, :z].float(), x0, noise, call["timestep"])
        # predict() at that input and timestep feeds the transformer exactly what the pipeline did
        mine = predict_inputs(adapter, pipe.transformer, call["hidden_states"][:, :z], call["timestep"], text,
                              tensors_only=True)  # fmt: skip
        assert set(mine) == set(call)
        for key in call:
            torch.testing.assert_close(mine[key], call[key], rtol=0, atol=0, msg=key)
        # the unconditional branch: the empty caption (negative_prompt=None), same video inputs
        for key, value in (("encoder_hidden_states", "prompt_embeds"), ("encoder_attention_mask", "prompt_embeds_mask"),
                           ("encoder_hidden_states_2", "prompt_embeds_2"),
                           ("encoder_attention_mask_2", "prompt_embeds_mask_2")):  # fmt: skip
            torch.testing.assert_close(uncond[key], empty[value].float(), rtol=0, atol=0, msg=key)
        torch.testing.assert_close(uncond["hidden_states"], call["hidden_states"], rtol=0, atol=0)
    first = calls[0]
    if variant.endswith("i2v"):  # the first frame's condition latents on frame 0 only, mask 1 there
        assert (
            first["hidden_states"][:, z:-1, 1:].abs().max() == 0 and first["hidden_states"][:, z:-1, 0].abs().max() > 0
        )
        assert first["hidden_states"][:, -1, 0].eq(1).all() and first["hidden_states"][:, -1, 1:].eq(0).all()
        assert first["image_embeds"].abs().max() > 0
    else:  # text-to-video: zero condition channels and zero SigLIP slots
        assert first["hidden_states"][:, z:].abs().max() == 0 and first["image_embeds"].abs().max() == 0
        assert first["image_embeds"].shape[1] == pipe.vision_num_semantic_tokens


def test_i2v_clip_size_is_the_pipelines_bucket():
    adapter = adapter_for(tiny_pipeline(variant="hunyuan15-i2v"), "tiny-hunyuan15-i2v")
    with pytest.raises(ValueError, match="--height 48 --width 64"):
        adapter.validate_clip(ClipSpec(9, 32, 48))  # the pipeline would generate 48x64 from such an image
    with pytest.raises(ValueError, match="num_frames"):
        adapter.validate_clip(ClipSpec(10, 48, 64))
    adapter.validate_clip(SPECS["hunyuan15-i2v"])


def test_refuses_pipelines_it_cannot_train():
    pipe = tiny_pipeline()
    pipe.text_encoder_2 = None
    with pytest.raises(ValueError, match="both text encoders"):
        adapter_for(pipe, "tiny-hunyuan15")
    i2v = tiny_pipeline(variant="hunyuan15-i2v")
    i2v.transformer.register_to_config(use_meanflow=True)
    with pytest.raises(ValueError, match="meanflow"):
        adapter_for(i2v, "tiny-hunyuan15-i2v")


@pytest.mark.slow  # two LoRA training runs and generations
@pytest.mark.parametrize("variant", ["hunyuan15", "hunyuan15-i2v"])
def test_train_then_generate(variant, tmp_path):
    import json

    from vidsparse.lora import load_lora

    spec, model = SPECS[variant], f"tiny-{variant}"
    _, out = train_tiny(tmp_path, model, spec)
    info = json.loads((out / "vidsparse_lora.json").read_text())
    assert info["family"] == "hunyuan15"
    fresh = tiny_pipeline(variant=variant)
    load_lora(fresh, out)  # HunyuanVideo15 pipelines have no load_lora_weights: the transformer loads it
    blocks = len(fresh.transformer.transformer_blocks)
    expected = {f"transformer_blocks.{i}.attn.{p}" for i in range(blocks) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert lora_module_names(fresh.transformer) == expected
    generate_tiny(model, out, spec, image_of=stepping_square_8bit(spec) if variant.endswith("i2v") else None)
