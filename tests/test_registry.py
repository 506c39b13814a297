"""The registries and contracts the layers share: families, backends, the pattern contract, the LRU."""

import dataclasses

import pytest
import torch

import vidsparse as vs
from vidsparse.families import (
    families,
    family_of_pipeline,
    geometries,
    get_family,
    register_family,
    supported_families_text,
    video_geometry,
)
from vidsparse.kernels.backends import backend_choices, backend_names, get_backend
from vidsparse.lru import LRUCache
from vidsparse.patterns import PATTERNS, Pattern, normalize_pattern_name


def test_every_family_record_is_complete():
    names = [f.name for f in families()]
    assert names[:5] == ["wan", "hunyuan", "cogvideox", "ltx", "mochi"]
    for fam in families():
        assert fam.transformer_classes and fam.pipeline_prefixes and fam.processor_names
        assert fam.text_position in ("none", "before", "after")
        assert fam.lora_adapter is not None or fam.lora_refusal
        assert fam.shard_plan is not None or fam.parallel_refusal
        assert fam.tiny, f"{fam.name} has no tiny model for tests"
        for geo in fam.geometries:
            frames, height, width = geo.default_video
            assert all(n > 0 for n in geo.latent_grid(frames, height, width))
    assert set(geometries()) == {
        "wan", "hunyuan", "cogvideox", "cogvideox1.5", "ltx", "mochi", "cosmos", "cosmos1", "kandinsky5",
        "hunyuan15", "hunyuan15-720p", "hunyuan-framepack", "ltx2", "wan22-5b", "skyreels-v2", "wan-vace",
        "wan-animate",
    }  # fmt: skip


def test_lookups_normalise_names_and_pick_the_longest_prefix():
    assert get_family("HunyuanVideo").name == "hunyuan" and get_family("LTX_Video").name == "ltx"
    assert get_family("cogvideox1.5").name == "cogvideox"
    assert video_geometry("CogVideoX-1.5").patch == (2, 2, 2) and video_geometry("cogvideox").patch == (1, 2, 2)
    assert family_of_pipeline("HunyuanVideoImageToVideoPipeline").name == "hunyuan"
    assert family_of_pipeline("LTXConditionPipeline").name == "ltx"
    assert "wan (WanTransformer3DModel)" in supported_families_text()
    with pytest.raises(ValueError, match="Unknown model family 'sora'. Expected one of: wan, wan22-5b, hunyuan"):
        video_geometry("sora")
    cog = get_family("cogvideox")
    assert cog.geometry_for({"patch_size": 2, "patch_size_t": 2}).name == "cogvideox1.5"
    assert cog.geometry_for({"patch_size": 2, "patch_size_t": None}).name == "cogvideox"


def test_register_family_refuses_clashing_names_and_incomplete_records():
    wan = get_family("wan")
    with pytest.raises(ValueError, match="already name 'wan'"):
        register_family(dataclasses.replace(wan, name="wan-copy", aliases=("wan2.1",)))
    with pytest.raises(TypeError, match="expects a vidsparse.families.Family"):
        register_family("wan")
    with pytest.raises(ValueError, match="lora_adapter or a lora_refusal"):
        dataclasses.replace(wan, lora_adapter=None, lora_refusal="")
    with pytest.raises(ValueError, match="text_position must be"):
        dataclasses.replace(wan, text_position="middle")


def test_backend_records():
    assert backend_names() == ("torch", "flex", "triton") and backend_choices()[0] == "auto"
    q = torch.randn(1, 8, 2, 16)
    assert get_backend("torch").can_run(q) is None and not get_backend("torch").fused
    triton = get_backend("triton")
    assert triton.fused and triton.default_block == 128
    odd = torch.randn(1, 8, 2, 12)  # head dim 12: not a power of two
    assert "head dim 12" in triton.can_run(odd)  # the reason, not an exception
    with pytest.raises(ValueError, match="Unknown backend 'cuda'"):
        get_backend("cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: head dim 12"):
        vs.attention(odd, odd, odd, vs.VideoLayout(2, 2, 2), vs.Dense(), backend="triton")


def test_pattern_contract_is_declared_on_every_pattern():
    for name, cls in PATTERNS.items():
        assert normalize_pattern_name(name) == name
        assert isinstance(cls.uses_layer, bool) and isinstance(cls.dynamic, bool)
        assert cls.families is None or isinstance(cls.families, tuple)
        assert cls.text_positions is None or isinstance(cls.text_positions, tuple)
        assert cls.fit_defaults({}, vs.VideoLayout(4, 4, 4), None) is not None
    assert normalize_pattern_name(" Attention_Tile ") == "attention-tile"
    lay = vs.VideoLayout(7, 2, 2)
    f = torch.arange(7)
    assert Pattern.attended_frames(vs.Radial(), lay, f, f) is None and vs.Radial().key_global_frames(lay) == []
    ds = vs.DualScope(1, 3)
    assert ds.key_global_frames(lay) == [0, 3, 6]
    assert torch.equal(ds.attended_frames(lay, f[:, None], f[None, :]), ds.frame_mask(lay, f[:, None], f[None, :]))


def test_lru_evicts_the_least_recent_and_caches_no_failure():
    cache = LRUCache(2)
    assert cache.get_or_build("a", lambda: 1) == 1 and cache.get_or_build("b", lambda: 2) == 2
    assert cache.get_or_build("a", lambda: 99) == 1  # hit: "a" becomes the most recent
    cache.get_or_build("c", lambda: 3)
    assert "b" not in cache and "a" in cache and len(cache) == 2

    def boom():
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        cache.get_or_build("d", boom)
    assert "d" not in cache
    with pytest.raises(ValueError, match="positive int"):
        LRUCache(0)


def test_register_pattern_makes_a_custom_pattern_reachable_by_name():
    """A user pattern (only ``video_mask`` defined) plans, runs and matches its own mask."""
    from typing import ClassVar

    from oracle import masked_attention, random_qkv

    from vidsparse.patterns import register_pattern

    @register_pattern
    @dataclasses.dataclass(frozen=True)
    class SameFrame(Pattern):
        name: ClassVar[str] = "Same_Frame"

        def video_mask(self, layout, qi, ki, layer=0):
            return layout.coords(qi)[0] == layout.coords(ki)[0]

    try:
        assert PATTERNS["same-frame"] is SameFrame and isinstance(vs.make_pattern("same_frame"), SameFrame)
        lay = vs.VideoLayout(3, 4, 4)
        q, k, v = random_qkv(lay)
        mask = vs.token_mask("same-frame", lay)
        assert mask.sum() == 3 * 16 * 16
        out = vs.attention(q, k, v, lay, "same-frame", backend="torch", block_size=16)
        torch.testing.assert_close(out, masked_attention(q, k, v, mask, lay).float())
        assert register_pattern(SameFrame) is SameFrame  # the same class again: a no-op
    finally:
        PATTERNS.pop("same-frame", None)


def test_register_pattern_refuses_what_it_cannot_register():
    from typing import ClassVar

    from vidsparse.patterns import register_pattern

    with pytest.raises(TypeError, match="expects a vidsparse.Pattern subclass"):
        register_pattern(object)

    class Unnamed(Pattern):
        pass

    with pytest.raises(ValueError, match="needs its own name"):
        register_pattern(Unnamed)

    class MyRadial(Pattern):
        name: ClassVar[str] = "RADIAL"

    with pytest.raises(ValueError, match="'radial' already names Radial"):
        register_pattern(MyRadial)
    assert PATTERNS["radial"] is vs.Radial


def test_clear_plan_cache_also_drops_what_the_backends_derived_from_plans():
    """The Triton block lists and Flex BlockMasks hold plan tensors alive: clearing the plans
    alone would free nothing."""
    from oracle import random_qkv

    from vidsparse.kernels import flex
    from vidsparse.kernels.triton_plan import CACHE

    lay = vs.VideoLayout(2, 4, 4)
    q, k, v = random_qkv(lay)
    vs.attention(q, k, v, lay, "radial", backend="flex", block_size=16)
    CACHE.get("test-entry", (torch.zeros(1),), lambda: 1)
    assert len(flex.BLOCK_MASKS) and len(CACHE)
    vs.clear_plan_cache()
    assert len(flex.BLOCK_MASKS) == 0 and len(CACHE) == 0
