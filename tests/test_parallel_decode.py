"""Per-clip VAE decode of every family, in one process: the latent video is split by hand across
'virtual ranks' (``clip_bounds``), each clip decoded with ``decode_clip``, and the concatenated
clips compared with the VAE's whole-video decode. Full context must be exact (bit-identical, or
within float tolerance where the record says so); short context must not be (the check can fail)."""

from __future__ import annotations

import importlib

import pytest
import torch

from vidsparse.families import clip_decode_of
from vidsparse.parallel.vae import clip_bounds, decode_clip, pixel_counts

#: family -> (latent frames, latent height/width, exact: "equal" bit-identical / "close" float tolerance)
CASES = {
    "wan": (8, 2, "equal"),
    "hunyuan": (8, 2, "equal"),  # > 4 latent frames: temporal tiles
    "cogvideox": (9, 2, "equal"),  # odd: the first decode batch holds 3 latent frames
    "mochi": (8, 2, "close"),
    "ltx": (8, 1, "close"),
    "ltx2": (8, 2, "close"),  # AutoencoderKLLTX2Video, decoder_causal=False (the checkpoints')
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: a second thread only contends on the shared test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vae(family: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return importlib.import_module(f"vidsparse.families.{family}").tiny_vae().eval()


def _latents(vae, frames: int, hw: int) -> torch.Tensor:
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
    return torch.randn(1, channels, frames, hw, hw, generator=torch.Generator().manual_seed(1))


def _decode_by_clips(vae, z, world: int, overlap, **kwargs) -> torch.Tensor:
    parts = [decode_clip(vae, z, s, e, overlap, **kwargs) for s, e in clip_bounds(vae, z.shape[2], world) if e > s]
    return torch.cat(parts, dim=2)


def _check_exact(got: torch.Tensor, want: torch.Tensor, exact: str) -> None:
    assert got.shape == want.shape
    if exact == "equal":
        assert torch.equal(got, want), (got - want).abs().max().item()
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_full_context_per_clip_decode_equals_the_whole_decode(family):
    frames, hw, exact = CASES[family]
    vae = _vae(family)
    assert clip_decode_of(vae) is importlib.import_module(f"vidsparse.families.{family}").FAMILY.clip_decode
    z = _latents(vae, frames, hw)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
    for world in (2, 3):
        assert sum(pixel_counts(vae, frames, world)) == full.shape[2]
        _check_exact(_decode_by_clips(vae, z, world, None), full, exact)


@pytest.mark.parametrize(
    "family, frames, overlaps",
    [("wan", 8, (1, 2)), ("cogvideox", 13, (1, 3)), ("mochi", 8, (1, 2)), ("ltx", 8, (1, 2)), ("ltx2", 8, (1, 2))],
)
def test_short_context_is_approximate_and_more_context_helps(family, frames, overlaps):
    """CogVideoX: context starts on a decode batch (2 latent frames), so 1 and 3 frames differ."""
    hw = CASES[family][1]
    vae = _vae(family)
    z = _latents(vae, frames, hw)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
    (_, _), (s, e) = clip_bounds(vae, frames, 2)
    tail = full[:, :, pixel_counts(vae, frames, 2)[0] :]
    errs = [(decode_clip(vae, z, s, e, o) - tail).abs().mean().item() for o in overlaps]
    assert errs[0] > errs[1] > 0, errs


def test_hunyuan_tiles_make_any_overlap_exact_and_a_single_tile_decodes_whole():
    vae = _vae("hunyuan")
    z = _latents(vae, 12, 2)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
    assert torch.equal(_decode_by_clips(vae, z, 3, 1), full)  # the window holds the clip's tiles whatever the overlap
    record = clip_decode_of(vae)
    assert record.window(vae, 12, 8, 12, 1).first == 3  # tiles start every 3 latent frames: the one before the clip
    assert record.window(vae, 4, 2, 4, 1).first == 0  # <= 4 latent frames: one decoder call over all frames
    vae.use_framewise_decoding = False  # one GroupNorm over every frame: each rank decodes everything
    assert record.window(vae, 12, 8, 12, 1) == type(record.window(vae, 4, 2, 4, 1))(0, 12, 0)


def test_cogvideox_clips_start_on_decode_batches():
    vae = _vae("cogvideox")
    assert clip_bounds(vae, 13, 2) == [(0, 7), (7, 13)]  # batches [0, 3) [3, 5) [5, 7) ...
    assert clip_bounds(vae, 12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert clip_bounds(vae, 5, 4) == [(0, 3), (3, 3), (3, 3), (3, 5)]  # empty clips decode nothing
    assert pixel_counts(vae, 5, 4) == [9, 0, 0, 8]
    z = _latents(vae, 5, 2)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
    assert torch.equal(_decode_by_clips(vae, z, 4, None), full)
    with pytest.raises(ValueError, match="batch boundary"):
        clip_decode_of(vae).pixel(vae, 13, 4)


def test_ltx_timestep_conditioned_decoder_per_clip():
    """LTX-Video 0.9.1+ decoders take a timestep: passed through to every window unchanged."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), timestep_conditioning=True,
        ).eval()  # fmt: skip
    z = _latents(vae, 8, 1)
    temb = torch.tensor([0.05])
    with torch.no_grad():
        full = vae.decode(z, temb, return_dict=False)[0]
        other = vae.decode(z, torch.tensor([0.5]), return_dict=False)[0]
    assert (full - other).abs().max() > 1e-4  # the timestep matters, so passing it is checked
    _check_exact(_decode_by_clips(vae, z, 3, None, temb=temb), full, "close")


def test_ltx2_causal_decoder_decodes_context_before_the_clip_only():
    """``decoder_causal=True``: time convolutions pad the past only, so the window needs no frames after."""
    vae = _vae("ltx2")
    vae.decoder.is_causal = True
    record = clip_decode_of(vae)
    assert record.window(vae, 8, 4, 6, 2) == type(record.window(vae, 8, 4, 6, 2))(2, 6, 16)
    z = _latents(vae, 8, 2)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
        two_sided = _vae("ltx2").decode(z, return_dict=False)[0]
    assert (full - two_sided).abs().max() > 1e-4  # the causal setting changes the decode: the check can fail
    _check_exact(_decode_by_clips(vae, z, 3, None), full, "close")


def test_mochi_without_dropped_frames():
    vae = _vae("mochi")
    vae.drop_last_temporal_frames = False  # every latent frame decodes to 6 pixel frames
    z = _latents(vae, 6, 2)
    with torch.no_grad():
        full = vae.decode(z, return_dict=False)[0]
    assert pixel_counts(vae, 6, 2) == [18, 18] and full.shape[2] == 36
    _check_exact(_decode_by_clips(vae, z, 2, None), full, "close")


def test_unknown_vae_is_refused_with_the_known_ones():
    from vidsparse.families.hunyuan15 import tiny_vae

    with pytest.raises(
        ValueError, match=r"No per-clip decode is known for AutoencoderKLHunyuanVideo15 \(known: .*AutoencoderKLWan"
    ):
        clip_bounds(tiny_vae(), 8, 2)


def test_run_parallel_refuses_a_bad_overlap_before_any_work():
    from vidsparse.parallel.pipeline import run_parallel

    class Pipe:  # parallelize would fail on this: the overlap must be refused first
        transformer = None

    with pytest.raises(ValueError, match=r"vae_overlap must be None .* got 0"):
        run_parallel(Pipe(), {}, "dense", "clip", None, vae_overlap=0)
