"""Kandinsky 5 T2V and I2V LoRA (``vidsparse.lora.adapters.kandinsky5``): the pipelines' own call, channel-last.

Checked on the family record's tiny ``Kandinsky5T2VPipeline`` (hashed prompts, as ``generate``
passes them; flow-matching Euler, shift 5; guidance 5): an ideal model of the trained flow
objective, put into the real sampler (both CFG calls), carries the noise to the clip's latents,
and each conditional call's inputs (channel-last latents, Qwen tokens, CLIP pooled, timestep,
visual / text RoPE positions, ``scale_factor``, NABLA ``sparse_params``) are exactly what
``adapter.predict`` passes at that noise level; NABLA included. With tiny Qwen2.5-VL and CLIP
text encoders built here, the cached text is the pipeline's ``encode_prompt`` (unpadded, as the
pipeline's own call with that prompt feeds it), and a batch of captions of different lengths
predicts what each does alone. I2V (``tiny-kandinsky5-i2v``, a ``visual_cond`` transformer): the cached first-frame condition
is what the real pipeline's ``prepare_latents`` gives it, frame 0 stays the clean image at every
step and the other frames reach the clip. Then ``train_lora`` and ``generate --lora`` on
``tiny-kandinsky5`` and ``tiny-kandinsky5-i2v``.
"""

import pytest
import torch
from lora_checks import (
    check_on_flow_path,
    generate_tiny,
    lora_module_names,
    predict_inputs,
    snapshot,
    stepping_square_8bit,
    train_tiny,
)

import vidsparse as vs
from vidsparse.families.kandinsky5 import tiny_pipeline, tiny_prompt_kwargs
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import adapter_for
from vidsparse.lora.train import collate_text

SPECS = {False: ClipSpec(9, 32, 48), True: ClipSpec(9, 128, 128)}  # NABLA: whole 8x8-token tiles
CAPTION = "a red square"


def _assert_same_inputs(mine: dict, theirs: dict) -> None:
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        if key == "sparse_params" and value is not None:
            assert set(mine[key]) == set(value)
            for k, v in value.items():
                assert torch.equal(mine[key][k], v) if torch.is_tensor(v) else mine[key][k] == v, k
        elif key == "visual_rope_pos":
            assert all(torch.equal(a, b) for a, b in zip(mine[key], value, strict=True))
        elif torch.is_tensor(value):
            torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
        else:
            assert mine[key] == value, key


@pytest.mark.parametrize("nabla", [False, True], ids=["regular", "nabla"])
def test_ideal_model_in_the_real_sampler_reaches_the_clip(nabla):
    pipe = tiny_pipeline(nabla=nabla)
    if nabla:  # the model's own NABLA needs FlexAttention on a GPU; training runs vidsparse's pattern anyway
        vs.apply(pipe, vs.SparseConfig(vs.Tile(tile=(1, 2, 2), window=(1, 1, 1)), backend="torch", dense_first_steps=0))
    adapter = adapter_for(pipe, "tiny-kandinsky5")
    assert adapter.default_flow_shift() == pipe.scheduler.config.shift == 5.0
    spec = SPECS[nabla]
    adapter.validate_clip(spec)
    x0 = adapter.encode_video(stepping_square_8bit(spec))  # [1, C, f, h, w]; the pipeline's latents are channel-last
    text = collate_text([adapter.encode_text(CAPTION)])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    last = lambda t: t.permute(0, 2, 3, 4, 1)  # noqa: E731
    calls = []

    def hook(module, args, kwargs, out):
        calls.append(snapshot(kwargs))
        return type(out)(sample=last(adapter.transformer_output(noise - x0)).to(out.sample.dtype))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            final = pipe(num_frames=spec.num_frames, height=spec.height, width=spec.width, num_inference_steps=4,
                         latents=last(noise).clone(), output_type="latent", return_dict=False,
                         **tiny_prompt_kwargs(pipe, CAPTION, ""))[0]  # fmt: skip
    finally:
        handle.remove()
    torch.testing.assert_close(final.float(), last(x0), rtol=0, atol=2e-4)
    assert len(calls) == 8  # conditional and unconditional call per step (guidance 5)
    assert (calls[0]["sparse_params"] is not None) == nabla
    for step in range(4):
        call = calls[2 * step]
        hidden = call["hidden_states"].permute(0, 4, 1, 2, 3).float()
        check_on_flow_path(adapter, hidden, x0, noise, call["timestep"])  # on the training path
        _assert_same_inputs(predict_inputs(adapter, pipe.transformer, hidden, call["timestep"], text), call)


def _text_encoders():
    """A byte-level Qwen2 tokenizer (Qwen's chat markers), a 1-layer Qwen2.5-VL and a 1-layer CLIP text
    model, in memory: the interfaces ``Kandinsky5T2VPipeline.encode_prompt`` calls."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
    )

    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                     "type": "default"}, **ids)  # fmt: skip
    vision = dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=2,
                  temporal_patch_size=1, spatial_merge_size=1)  # fmt: skip
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, **ids)).eval()  # fmt: skip
    return tok, qwen, clip


def test_i2v_ideal_model_in_the_real_sampler_reaches_the_clip():
    """I2V: the cached first-frame condition is what the real pipeline feeds (its own prepare_latents
    with the adapter's seed), frame 0 stays the clean image, the other frames reach the clip."""
    from diffusers.utils.torch_utils import randn_tensor

    from vidsparse.lora.adapters.wan_i2v import first_frame_image

    pipe = tiny_pipeline(variant="kandinsky5-i2v")
    adapter = adapter_for(pipe, "tiny-kandinsky5-i2v")
    spec = ClipSpec(17, 32, 48)  # 5 latent frames: the fewest the pipeline's normalize_first_frame takes
    with pytest.raises(ValueError, match="at least 17 frames"):
        adapter.validate_clip(ClipSpec(9, 32, 48))
    adapter.validate_clip(spec)
    clip = stepping_square_8bit(spec)
    enc = adapter.encode_clip(clip)
    x0, made = enc["latents"], enc["image_condition"]
    c = x0.shape[1]
    assert made.shape == (1, *x0.shape[2:], 2 * c + 1)
    assert made[:, 1:, ..., :c].eq(0).all() and made[:, 0, ..., :c].abs().max() > 0  # only the image frame
    assert made[:, 0, ..., -1].eq(1).all() and made[:, 1:, ..., -1].eq(0).all() and made[..., c:-1].eq(0).all()
    text = {**collate_text([adapter.encode_text(CAPTION)]), "image_condition": made}
    # the noise the pipeline draws first from a generator seeded as the adapter's (then the image's sample)
    noise = randn_tensor((1, *x0.shape[2:], c), generator=torch.Generator().manual_seed(adapter.image_seed))
    noise = noise.permute(0, 4, 1, 2, 3)
    velocity = (noise - x0).permute(0, 2, 3, 4, 1)
    calls, last = [], {}

    def hook(module, args, kwargs, out):
        calls.append(snapshot(kwargs))
        return type(out)(sample=velocity.to(out.sample.dtype))

    def at_step_end(pipe_, i, t, kwargs):
        last["latents"] = kwargs["latents"].clone()  # before normalize_first_frame
        return kwargs

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(image=first_frame_image(clip[0]), num_frames=spec.num_frames, height=spec.height, width=spec.width,
             num_inference_steps=4, generator=torch.Generator().manual_seed(adapter.image_seed), output_type="latent",
             callback_on_step_end=at_step_end, callback_on_step_end_tensor_inputs=["latents"],
             **tiny_prompt_kwargs(pipe, CAPTION, ""))  # fmt: skip
    finally:
        handle.remove()
    final = last["latents"].permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(final[:, :c, 1:], x0[:, :, 1:], rtol=0, atol=2e-4)  # the sampled frames
    assert len(calls) == 8
    for step in range(4):
        call = calls[2 * step]
        torch.testing.assert_close(call["hidden_states"][:, :1], made[:, :1], rtol=0, atol=0)  # clean image frame
        torch.testing.assert_close(call["hidden_states"][..., c:], made[..., c:], rtol=0, atol=0)
        hidden = call["hidden_states"][..., :c].permute(0, 4, 1, 2, 3).float()
        check_on_flow_path(adapter, hidden[:, :, 1:], x0[:, :, 1:], noise[:, :, 1:])
        _assert_same_inputs(predict_inputs(adapter, pipe.transformer, hidden, call["timestep"], text), call)
    pred = torch.randn(x0.shape)
    target = pred.clone()
    target[:, :, 0] += 1.0
    assert adapter.loss(pred, target, text) == 0  # frame 0 is never stepped: out of the loss


def test_text_is_the_pipelines_encode_prompt_unpadded():
    pipe = tiny_pipeline()
    tok, qwen, clip = _text_encoders()
    pipe.register_modules(text_encoder=qwen, tokenizer=tok, text_encoder_2=clip, tokenizer_2=tok)
    pipe.prompt_template_encode_start_idx = len(tok(pipe.prompt_template.split("{}")[0]).input_ids)
    adapter = adapter_for(pipe, "kandinsky5-with-encoders")
    captions = ["a red square", "a blue ball bouncing high"]
    items = [adapter.encode_text(c) for c in captions]
    for caption, item in zip(captions, items):
        emb, pooled, cu = pipe.encode_prompt([caption], device="cpu", dtype=torch.float32)
        n = int(item["prompt_length"])
        assert cu.tolist() == [0, n] and emb.shape[1] == n < adapter.max_sequence_length
        torch.testing.assert_close(item["prompt_embeds_qwen"][:n], emb[0], rtol=0, atol=0)
        assert not item["prompt_embeds_qwen"][n:].any()  # padding of the cache only
        torch.testing.assert_close(item["prompt_embeds_clip"], pooled[0], rtol=0, atol=0)
    assert items[0]["prompt_length"] != items[1]["prompt_length"]

    # the pipeline's own call with the caption feeds the transformer those unpadded tokens
    spec = SPECS[False]
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(snapshot(k)), with_kwargs=True)
    try:
        pipe(prompt=captions[1], num_frames=spec.num_frames, height=spec.height, width=spec.width,
             num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    n = int(items[1]["prompt_length"])
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], items[1]["prompt_embeds_qwen"][None, :n])
    assert torch.equal(seen[0]["text_rope_pos"], torch.arange(n))

    # a batch of captions of different lengths: each predicts what it does alone
    adapter.validate_clip(spec)
    x = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        both = adapter.predict(pipe.transformer, x, t, collate_text(items))
        alone = [
            adapter.predict(pipe.transformer, x[i : i + 1], t[i : i + 1], collate_text([items[i]])) for i in (0, 1)
        ]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_visual_cond_channels_are_the_pipelines():
    """A ``visual_cond`` transformer: the T2V pipeline's zero condition latents and zero mask after the noise."""
    import diffusers

    from vidsparse.families.kandinsky5 import tiny_transformer_kwargs

    pipe = tiny_pipeline()
    cond = diffusers.Kandinsky5Transformer3DModel(**tiny_transformer_kwargs(visual_cond=True)).eval()
    pipe.register_modules(transformer=cond)
    adapter = adapter_for(pipe, "tiny-kandinsky5-visual-cond")
    spec = SPECS[False]
    c = cond.config.in_visual_dim
    made = pipe.prepare_latents(1, c, spec.height, spec.width, spec.num_frames, torch.float32, torch.device("cpu"),
                                torch.Generator().manual_seed(0))  # fmt: skip
    assert made.shape[-1] == 2 * c + 1
    torch.testing.assert_close(adapter.model_input(made[..., :c].permute(0, 4, 1, 2, 3), {}), made, rtol=0, atol=0)
    text = collate_text([adapter.encode_text(CAPTION)])
    with torch.no_grad():
        out = adapter.predict(cond, made[..., :c].permute(0, 4, 1, 2, 3), torch.tensor([500.0]), text)
    assert out.shape == (1, c, *made.shape[1:4])


def test_refusals_name_what_to_train():
    from vidsparse.lora.models import refusal

    for name in ("Kandinsky5T2IPipeline", "Kandinsky5I2IPipeline"):
        assert "Train Kandinsky5T2VPipeline" in refusal(name, "kandinsky") or "train Kandinsky5T2VPipeline" in refusal(
            name, "kandinsky"
        )
    assert refusal("Kandinsky5T2VPipeline", "kandinsky") is None and refusal("Kandinsky5I2VPipeline", "k") is None
    with pytest.raises(ValueError, match="NABLA"):
        adapter_for(tiny_pipeline(nabla=True), "tiny").validate_clip(ClipSpec(9, 32, 48))


@pytest.mark.slow  # a LoRA training run and a generation
def test_train_then_generate_i2v(tmp_path):
    spec = ClipSpec(17, 32, 48)
    _, out = train_tiny(tmp_path, "tiny-kandinsky5-i2v", spec)
    generate_tiny("tiny-kandinsky5-i2v", out, spec, image_of=stepping_square_8bit(spec))


@pytest.mark.slow  # a LoRA training run and a generation
def test_train_then_generate(tmp_path):
    import json

    from vidsparse.lora import load_lora

    spec = SPECS[False]
    _, out = train_tiny(tmp_path, "tiny-kandinsky5", spec, batch_size=2)
    assert json.loads((out / "vidsparse_lora.json").read_text())["family"] == "kandinsky5"
    fresh = tiny_pipeline()
    load_lora(fresh, out)
    blocks = len(fresh.transformer.visual_transformer_blocks)
    expected = {f"visual_transformer_blocks.{i}.self_attention.{p}" for i in range(blocks)
                for p in ("to_query", "to_key", "to_value", "out_layer")}  # fmt: skip
    assert lora_module_names(fresh.transformer) == expected
    generate_tiny("tiny-kandinsky5", out, spec)
