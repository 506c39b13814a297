"""SkyReels-V2 LoRA: its T2V / I2V pipelines call the transformer as Wan 2.1's, so the Wan adapters train them.

Checked on the family record's tiny pipelines (UniPC on flow sigmas, ``flow_shift`` 8): an ideal
model of the trained flow objective, put into the real ``SkyReelsV2Pipeline`` /
``SkyReelsV2ImageToVideoPipeline`` sampler, carries the noise to the clip's latents (UniPC's
multistep data prediction is exact on a straight path); I2V's cached condition is what the real
pipeline feeds the transformer; the default shift is the scheduler's; a short ``train_lora`` run
then ``generate --image --lora`` on ``tiny-skyreels-v2-i2v``.
"""

import pytest
import torch
from lora_checks import check_on_flow_path, generate_tiny, pipeline_calls, stepping_square_8bit, train_tiny

from vidsparse.families.skyreels import tiny_pipeline
from vidsparse.lora.adapters.base import first_frame_image
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

SPEC = ClipSpec(9, 32, 32)


@pytest.mark.parametrize("variant", ["skyreels-v2", "skyreels-v2-i2v"])
def test_ideal_model_in_the_real_sampler_reaches_the_clip(variant):
    pipe = tiny_pipeline(variant=variant)
    adapter = adapter_for(pipe, f"tiny-{variant}")
    assert adapter.default_flow_shift() == 8.0
    adapter.validate_clip(SPEC)
    clip = stepping_square_8bit(SPEC, side=12)
    enc = adapter.encode_clip(clip)
    x0 = enc["latents"]
    text = {**collate_text([adapter.encode_text("a red square")]), **{k: v for k, v in enc.items() if k != "latents"}}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    kwargs = dict(image=first_frame_image(clip[0])) if variant.endswith("i2v") else {}
    final, calls = pipeline_calls(pipe.transformer, lambda: pipe(
        prompt_embeds=text["prompt_embeds"], num_frames=SPEC.num_frames, height=SPEC.height, width=SPEC.width,
        num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(), output_type="latent", return_dict=False,
        **kwargs,
    )[0], adapter.transformer_output(noise - x0), tensors_only=True)  # fmt: skip
    torch.testing.assert_close(final.float(), x0, rtol=0, atol=2e-4)
    z = x0.shape[1]
    for call in calls:
        if variant.endswith("i2v"):
            torch.testing.assert_close(call["hidden_states"][:, z:], enc["condition"], rtol=0, atol=0)
            torch.testing.assert_close(call["encoder_hidden_states_image"], enc["image_embeds"], rtol=0, atol=0)
        # on the training path; UniPC feeds integer timesteps (int(1000 s), capped at 999): within 1 of 1000 s
        check_on_flow_path(adapter, call["hidden_states"][:, :z].float(), x0, noise, call["timestep"].float(),
                           timestep_atol=1.0)  # fmt: skip


def test_train_then_generate_i2v(tmp_path):
    _, out = train_tiny(tmp_path, "tiny-skyreels-v2-i2v", SPEC)
    generate_tiny("tiny-skyreels-v2-i2v", out, SPEC, image_of=stepping_square_8bit(SPEC, side=12))
