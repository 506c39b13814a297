"""Wan VACE LoRA trained as text-to-video (``vidsparse.lora.adapters.wan_vace``): the pipeline's empty control.

Checked on the family record's tiny ``WanVACEPipeline`` (hashed prompts, flow-matching Euler,
shift 3, guidance 5): called with no video / mask / reference images, the real pipeline feeds
the control branch exactly the cached ``"control"`` (built by its own ``preprocess_conditions``,
``prepare_video_latents`` and ``prepare_masks``) with the default conditioning scale of ones,
which is the transformer's own default for none; an ideal model of the trained flow objective in
the real sampler carries the noise to the clip; ``predict`` feeds the transformer those inputs.
Then ``train_lora`` and ``generate --lora`` on ``tiny-wan-vace``.
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

from vidsparse.families.wan_vace import tiny_pipeline
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text
from vidsparse.models.tiny import encode_prompt_tiny

SPEC = ClipSpec(9, 32, 48)


def test_ideal_model_in_the_real_sampler_reaches_the_clip():
    pipe = tiny_pipeline()
    adapter = adapter_for(pipe, "tiny-wan-vace")
    assert adapter.default_flow_shift() == pipe.scheduler.config.shift == 3.0
    adapter.validate_clip(SPEC)
    enc = adapter.encode_clip(stepping_square_8bit(SPEC))
    x0, control = enc["latents"], enc["control"]
    z = pipe.vae.config.z_dim
    assert control.shape == (1, 2 * z + 64, *x0.shape[2:])
    assert control[:, 2 * z :].eq(1).all()  # the all-ones mask, folded to 64 channels
    text = {**collate_text([adapter.encode_text("a red square")]), "control": control}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    final, calls = pipeline_calls(pipe.transformer, lambda: pipe(
        prompt_embeds=text["prompt_embeds"], negative_prompt_embeds=encode_prompt_tiny("", dim=16),
        num_frames=SPEC.num_frames, height=SPEC.height, width=SPEC.width, num_inference_steps=4,
        latents=noise.clone(), output_type="latent", return_dict=False,
    )[0], adapter.transformer_output(noise - x0), tensors_only=True)  # fmt: skip
    torch.testing.assert_close(final.float(), x0, rtol=0, atol=2e-4)
    assert len(calls) == 8
    for step in range(4):
        call = calls[2 * step]
        torch.testing.assert_close(call["control_hidden_states"], control, rtol=0, atol=0)
        # the pipeline's default conditioning_scale: ones over vace_layers, the transformer's default for None
        assert call["control_hidden_states_scale"].eq(1).all()
        assert len(call["control_hidden_states_scale"]) == len(pipe.transformer.config.vace_layers)
        check_on_flow_path(adapter, call["hidden_states"].float(), x0, noise, call["timestep"].float())
        mine = predict_inputs(adapter, pipe.transformer, call["hidden_states"], call["timestep"], text,
                              tensors_only=True)  # fmt: skip
        assert set(mine) == set(call) - {"control_hidden_states_scale"}
        for key in mine:
            torch.testing.assert_close(mine[key], call[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():  # None and the pipeline's ones give the same prediction
        a = pipe.transformer(**calls[0], return_dict=False)[0]
        b = pipe.transformer(**{k: v for k, v in calls[0].items() if k != "control_hidden_states_scale"},
                             return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # a LoRA training run and a generation
def test_train_then_generate(tmp_path):
    from vidsparse.lora import load_lora

    _, out = train_tiny(tmp_path, "tiny-wan-vace", SPEC, batch_size=2)
    fresh = tiny_pipeline()
    load_lora(fresh, out)
    t = fresh.transformer
    expected = {f"{blocks}.{i}.attn1.{p}" for blocks in ("blocks", "vace_blocks") for i in range(len(getattr(t, blocks)))
                for p in ("to_q", "to_k", "to_v", "to_out.0")}  # fmt: skip
    assert lora_module_names(t) == expected
    generate_tiny("tiny-wan-vace", out, SPEC)
