"""The trained tiny model (``--model tiny``): its synthetic world, text side, training script and
shipped weights (docs/tiny_model.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vidsparse.models import synthetic_world as world


def _uint8(video: np.ndarray) -> np.ndarray:
    return (video * 255).round().astype(np.uint8)


# -- the world and its reader -----------------------------------------------------------------


@pytest.mark.parametrize("frames", [17, 33])
def test_reader_recovers_rendered_scenes(frames):
    scenes = [world.Scene(c, s, m, bg, (0.2, 0.8, 0.5, 0.3), 0.7)
              for (c, s, m), bg in zip(world.HELD_OUT, world.BACKGROUNDS * 3)]  # fmt: skip
    scenes.append(world.Scene("red", "ball", "bouncing"))
    for scene in scenes:
        check = world.check_prompt(_uint8(world.render(scene, frames)), scene.caption)
        assert check.passed and check.shape_ok, (scene, check.reading)


def test_reader_rejects_the_wrong_prompt_and_an_empty_video():
    video = _uint8(world.render(world.Scene("red", "square", "moving left", "striped")))
    assert not world.check_prompt(video, "a blue square moving left").colour_ok
    wrong_motion = world.check_prompt(video, "a red square moving right")
    assert wrong_motion.colour_ok and not wrong_motion.motion_ok and not wrong_motion.passed
    grey = np.full((17, 64, 96, 3), 40, np.uint8)
    empty = world.check_prompt(grey, "a red ball bouncing")
    assert empty.reading.colour is None and not empty.passed
    with pytest.raises(ValueError, match="names no shape"):
        world.parse_caption("a red thing bouncing")


def test_held_out_combinations_are_out_of_training_but_their_words_are_in():
    scenes = world.training_scenes(1)
    seen = {(s.colour, s.shape, s.motion) for s in scenes}
    assert not seen & set(world.HELD_OUT)
    for colour, shape, motion in world.HELD_OUT:
        assert any(t[0] == colour for t in seen) and any(t[1] == shape for t in seen)
        assert any(t[2] == motion for t in seen)
    assert ("blue", "ball", "bouncing") in seen  # the README's prompt is a trained caption
    assert ("red", "ball", "bouncing") in seen  # so is the reference generation's (and the CLI default)
    assert world.parse_caption("a blue square moving left on a striped background") == (
        "blue", "square", "moving left", "striped")  # fmt: skip


def test_tokenizer_has_one_token_per_word_and_no_unknowns_for_the_grammar():
    from vidsparse.models.tiny_text import UNK, build_tokenizer

    tok = build_tokenizer()
    unk = tok.convert_tokens_to_ids(UNK)
    for colour, shape, motion in world.HELD_OUT:
        text = world.caption(colour, shape, motion, "checkered")
        ids = tok(text).input_ids
        assert unk not in ids and len(ids) == len(text.split()) + 1  # + </s>
    assert tok("a red ball, bouncing!").input_ids == tok("a red ball bouncing").input_ids
    assert unk in tok("a red zebra").input_ids


@pytest.mark.parametrize(
    "prompt,says",
    [
        ("a red ball bouncing", None),
        ("A blue square, moving left on a striped background", None),
        ("a purple elephant flying", "does not know 'purple', 'elephant', 'flying'; it names no colour"),
        ("a red ball", "it names no motion of the synthetic world"),
        ("", "it names no colour"),
        ("a red ball bouncing happily", "does not know 'happily'."),
    ],
)
def test_a_prompt_outside_the_tiny_world_is_named_before_the_run(prompt, says):
    from vidsparse.generation import GenerateOptions, prepare
    from vidsparse.models.tiny_text import UNK, build_tokenizer

    note = prepare(GenerateOptions(prompt=prompt, progress=False)).prompt_note
    assert note is None if says is None else says in note, note
    if says and "does not know" in says:  # exactly the words its tokenizer maps to the unknown token
        tok = build_tokenizer()
        unknown = [w for w in prompt.split() if tok.convert_tokens_to_ids(w) == tok.convert_tokens_to_ids(UNK)]
        assert says.split(";")[0].removesuffix(".") == "does not know " + ", ".join(repr(w) for w in unknown)
    # only the trained model reads words: the random-init pipelines make noise for any prompt
    assert prepare(GenerateOptions(model="tiny-random", prompt=prompt, progress=False)).prompt_note is None


# -- the training script ----------------------------------------------------------------------


def test_collapsed_pad_cross_attention_equals_the_pipelines_512_padding():
    from diffusers import WanTransformer3DModel

    from vidsparse.models import train_tiny as tt
    from vidsparse.models.tiny_text import build_text_encoder, build_tokenizer
    from vidsparse.models.tiny_vae import TinyVideoVAE

    tok = build_tokenizer()
    torch.manual_seed(0)
    enc = build_text_encoder(tt.TEXT_DIM, len(tok)).eval()
    model = WanTransformer3DModel(**tt.transformer_config(tt.Z_DIM, tt.TEXT_DIM)).eval()
    prompts = ["a red ball bouncing", "a blue square moving left on a striped background", ""]
    t = tok(prompts, padding="max_length", max_length=tt.CAPTION_TOKENS, return_tensors="pt")
    pipe = tt.assemble(model, TinyVideoVAE(z_dim=tt.Z_DIM), enc, tok)
    with torch.no_grad():
        pipe_emb, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=512,
                                         device="cpu")  # fmt: skip
        assert torch.allclose(pipe_emb, tt.pipeline_embeddings(enc, t.input_ids, t.attention_mask), atol=1e-6)
        x, ts = torch.randn(3, tt.Z_DIM, 2, 4, 6), torch.tensor([100.0, 500.0, 900.0])
        full = model(x, ts, pipe_emb, return_dict=False)[0]
        proc = tt.collapse_cross_attention(model)
        proc.bias = tt.CollapsedPadCrossAttention.pad_bias(t.attention_mask)
        short = model(x, ts, tt.pipeline_embeddings(enc, t.input_ids, t.attention_mask, tt.CAPTION_TOKENS),
                      return_dict=False)[0]  # fmt: skip
    assert torch.allclose(full, short, atol=1e-5)
    proc.bias = torch.zeros_like(proc.bias)  # no correction: 512 zero keys are not 16 of them
    with torch.no_grad():
        wrong = model(x, ts, tt.pipeline_embeddings(enc, t.input_ids, t.attention_mask, tt.CAPTION_TOKENS),
                      return_dict=False)[0]  # fmt: skip
    assert not torch.allclose(full, wrong, atol=1e-3)


def test_tiny_transformer_is_wan_plus_an_absolute_position_code(tmp_path):
    """Zero position code: exactly diffusers' WanTransformer3DModel with the same weights (the
    oracle); a non-zero code changes the output. Saved and reloaded through from_pretrained, and
    vidsparse sees a Wan transformer (its patterns and hooks apply)."""
    from diffusers import WanTransformer3DModel

    from vidsparse.families import family_of
    from vidsparse.models import train_tiny as tt
    from vidsparse.models.tiny_wan_model import TinyWanTransformer3DModel

    torch.manual_seed(0)
    tiny = TinyWanTransformer3DModel(**tt.transformer_config(tt.Z_DIM, tt.TEXT_DIM)).eval()
    plain = WanTransformer3DModel(**tt.transformer_config(tt.Z_DIM, tt.TEXT_DIM)).eval()
    missing, unexpected = plain.load_state_dict(tiny.state_dict(), strict=False)
    assert not missing and unexpected == ["position_embedding.proj.weight", "position_embedding.proj.bias"]
    x, ts, text = torch.randn(1, tt.Z_DIM, 3, 4, 6), torch.tensor([700.0]), torch.randn(1, 8, tt.TEXT_DIM)
    with torch.no_grad():
        assert torch.equal(tiny(x, ts, text, return_dict=False)[0], plain(x, ts, text, return_dict=False)[0])
        torch.nn.init.normal_(tiny.position_embedding.proj.weight, std=0.5)
        out = tiny(x, ts, text, return_dict=False)[0]
        assert not torch.allclose(out, plain(x, ts, text, return_dict=False)[0], atol=1e-3)
        tiny.save_pretrained(tmp_path)
        again = TinyWanTransformer3DModel.from_pretrained(tmp_path).eval()
        assert torch.equal(again(x, ts, text, return_dict=False)[0], out)
    assert family_of(again).name == "wan"


@pytest.mark.slow
def test_training_script_runs_a_few_steps_and_writes_a_loadable_pipeline(tmp_path):
    from vidsparse.models.tiny_trained import REFERENCE_FILE, load_trained_tiny
    from vidsparse.models.train_tiny import TrainTinyConfig, train

    out = tmp_path / "tiny"
    cfg = TrainTinyConfig(out=out, variants=1, vae_steps=2, vae_batch=1, steps=2, batch=2, frames=5, height=32,
                          width=48, log_every=1)  # fmt: skip
    logs: list[str] = []
    meta = train(cfg, log=logs.append)
    assert any(m.startswith("vae step 1/2") for m in logs) and any(m.startswith("step 1/2") for m in logs)
    assert meta["config"]["steps"] == 2 and meta["train_cpu_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folder left behind
    ref = json.loads((out / REFERENCE_FILE).read_text())
    assert ref["prompt"] == "a red ball bouncing" and len(ref["thumbnail"]) == ref["frames"]
    pipe = load_trained_tiny(folder=out)
    assert type(pipe.vae).__name__ == "TinyVideoVAE" and pipe.text_encoder is not None
    assert pipe.transformer.dtype == torch.float32  # stored fp16, loaded as asked
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        TrainTinyConfig(out=out, frames=6)


# -- the shipped weights ----------------------------------------------------------------------


def _shipped():
    from vidsparse.models.tiny_trained import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        pytest.fail(f"the trained tiny weights are missing from {WEIGHTS_DIR}")
    return WEIGHTS_DIR


def test_shipped_weights_are_small_and_reproduce_the_reference_generation():
    from vidsparse.models.tiny_trained import REFERENCE_FILE, load_trained_tiny, thumbnail

    folder = _shipped()
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert size < 4 * 2**20, f"{size} bytes of weights"
    ref = json.loads((folder / REFERENCE_FILE).read_text())
    pipe = load_trained_tiny()
    frames = pipe(prompt=ref["prompt"], num_frames=ref["frames"], height=ref["height"], width=ref["width"],
                  num_inference_steps=ref["steps"], guidance_scale=ref["guidance"],
                  generator=torch.Generator().manual_seed(ref["seed"]), output_type="np").frames[0]  # fmt: skip
    got = np.asarray(thumbnail(frames))
    assert got.shape == np.asarray(ref["thumbnail"]).shape
    assert np.abs(got - np.asarray(ref["thumbnail"])).max() < 0.02


#: Prompts the shipped model must show right, colour and motion, read back from the frames (seed 0,
#: dense). The blue ball three times with three motion words, same seed (same starting noise): the
#: motion follows the prompt, not the noise (the first model drew the same track for every motion
#: word). Two are held-out combinations, never in training. The model does not pass every prompt
#: (benchmarks/results/tiny_quality.md measures the rates); these are ones it passes.
CHECKED_PROMPTS = [
    ("a blue ball moving left", False),
    ("a blue ball bouncing", False),
    ("a blue ball growing", True),
    ("a red square moving left", True),
    ("a red ball moving down", False),
]


@pytest.mark.parametrize("prompt, held_out", CHECKED_PROMPTS)
def test_shipped_model_shows_the_colour_and_motion_asked_for(prompt, held_out):
    from vidsparse.generation import GenerateOptions, generate

    _shipped()
    assert (world.parse_caption(prompt)[:3] in world.HELD_OUT) == held_out
    result = generate(GenerateOptions(model="tiny", prompt=prompt, pattern="dense", progress=False, device="cpu"))
    check = world.check_prompt(result.frames, prompt)
    assert check.colour_ok and check.motion_ok, check.as_dict()


def test_compare_dense_on_tiny_gives_finite_numbers():
    from vidsparse.generation import GenerateOptions, generate

    _shipped()
    result = generate(GenerateOptions(model="tiny", pattern="radial", compare_dense=True, steps=4, progress=False,
                                      device="cpu"))  # fmt: skip
    assert result.model == "tiny" and result.frames.shape == (17, 64, 96, 3)
    assert math.isfinite(result.dense.psnr_db) and result.dense.psnr_db > 10


def test_tiny_random_is_the_random_init_pipeline():
    from vidsparse.generation import TINY_DEFAULTS, resolve_model
    from vidsparse.generation.loading import load_pipeline
    from vidsparse.generation.options import GenerateOptions, prepare

    info = resolve_model("tiny-random")
    assert info.kind == "tiny" and dict(info.defaults) == TINY_DEFAULTS
    pipe = load_pipeline(prepare(GenerateOptions(model="tiny-random", frames=5, height=32, width=32, steps=1)))
    assert pipe.text_encoder is None and type(pipe.vae).__name__ == "AutoencoderKLWan"
    trained = resolve_model("tiny")
    assert trained.defaults["frames"] == world.TRAIN_FRAMES and trained.defaults["height"] == world.HEIGHT
