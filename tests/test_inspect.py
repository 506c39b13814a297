"""`vidsparse inspect`: grids from --grid and --video, densities (exact against the token mask), PNGs."""

import json

import pytest
import torch

import vidsparse as vs
from vidsparse.cli import main
from vidsparse.density import token_density, video_block_density
from vidsparse.families import geometries
from vidsparse.families import video_geometry as family_grid
from vidsparse.visualize import plot_plan, query_row, selection_matrix

FAMILIES = geometries()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_inspect_grid_writes_png_and_prints_densities(tmp_path, capsys):
    png, js = tmp_path / "radial.png", tmp_path / "r.json"
    argv = ["inspect", "--pattern", "radial", "--decay-factor", "0.5", "--sink", "--pattern-block-size", "16"]
    argv += ["--grid", "6x4x5", "--query", "3,2,2", "--out", str(png), "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6x4x5" in out and "static pattern" in out and "%" in out and str(png) in out
    assert _is_png(png)
    report = json.loads(js.read_text())
    assert report["grid"] == [6, 4, 5] and report["block_size"] == 16  # the pattern's own block size
    (row,) = report["layers"]
    plan = vs.plan(vs.Radial(decay_factor=0.5, sink=True, block_size=16), vs.VideoLayout(6, 4, 5), block_size=16)
    assert row["block_density"] == pytest.approx(plan.density)
    assert 0 < row["token_density"] <= row["block_density"] < 1


def test_inspect_video_uses_family_factors_and_text_span(tmp_path, capsys):
    png = tmp_path / "v.png"
    argv = ["inspect", "--pattern", "tile", "--tile", "2,2,2", "--window", "3,1,3", "--video", "33x64x96"]
    argv += ["--family", "hunyuan", "--text-len", "12", "--out", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "9x4x6, text 12 after" in out and "hunyuan" in out
    assert _is_png(png)


@pytest.mark.parametrize(
    "text_len,origin",
    [([], "(grid 8x8x8, cogvideox text span)"), (["--text-len", "7"], "(grid 8x8x8, 7 text tokens)"),
     (["--text-len", "0"], "(grid 8x8x8)")],
)  # fmt: skip
def test_inspect_grid_names_the_text_span_it_really_has(capsys, text_len, origin):
    argv = ["inspect", "--pattern", "radial", "--grid", "8x8x8", "--family", "cogvideox", "--no-plot", *text_len]
    assert main(argv) == 0
    assert origin in capsys.readouterr().out


def test_inspect_bad_inputs_exit_2(tmp_path, capsys):
    base = ["inspect", "--pattern", "radial", "--out", str(tmp_path / "x.png")]
    cases = [
        (["--video", "80x480x832"], "nearest valid: 77 or 81"),
        (["--video", "81x480x840", "--family", "ltx"], "multiple of 32"),
        (["--grid", "21x30"], "three positive integers"),
        (["--grid", "4x4x4", "--video", "9x64x64"], "exactly one of"),
        (["--grid", "4x4x4", "--query", "4,0,0"], "outside the grid"),
        (["--grid", "4x4x4", "--family", "sora", "--video", "9x64x64"], None),
        (["--video", "9x64x64", "--family", "sora"], "Unknown model family"),
        (["--grid", "4x4x4", "--block-size", "48"], "power of two"),
        (["--grid", "4x4x4", "--json", str(tmp_path)], "is a directory; give a file name inside it"),
        (["--grid", "4x4x4", "--out", str(tmp_path / "x.jpg")], "expected a path ending in .png"),
    ]
    for extra, message in cases:
        rc = main([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert "Traceback" not in err
        if message:
            assert message in err, (extra, err)
    assert not (tmp_path / "x.png").exists()


def test_family_grids():
    assert FAMILIES["wan"].latent_grid(81, 480, 832) == (21, 30, 52)
    assert FAMILIES["wan"].latent_grid(81, 720, 1280) == (21, 45, 80)
    assert family_grid("HunyuanVideo").latent_grid(129, 720, 1280) == (33, 45, 80)
    assert family_grid("ltx").latent_grid(161, 512, 704) == (21, 16, 22)
    assert family_grid("mochi").latent_grid(163, 480, 848) == (28, 30, 53)
    assert family_grid("cogvideox").latent_grid(49, 480, 720) == (13, 30, 45)
    assert family_grid("cogvideox1.5").latent_grid(81, 768, 1360) == (11, 48, 85)  # 21 latent frames padded to 22
    with pytest.raises(ValueError, match=r"frames=6.*nearest valid: 5 or 9.*height=2.*nearest valid: 16\."):
        family_grid("wan").latent_grid(6, 2, 480)


def test_inspect_dynamic_pattern_states_random_qk_per_layer(tmp_path, capsys):
    png, js = tmp_path / "vmoba.png", tmp_path / "v.json"
    argv = ["inspect", "--pattern", "vmoba", "--temporal-chunk", "2", "--spatial-chunk", "2,3", "--st-chunk", "2,2,3"]
    argv += [
        "--grid",
        "5x4x6",
        "--block-size",
        "16",
        "--heads",
        "3",
        "--layer",
        "2",
        "--out",
        str(png),
        "--json",
        str(js),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM q/k" in out
    report = json.loads(js.read_text())
    assert [r["variant"] for r in report["layers"]] == ["temporal", "spatial", "spatiotemporal"]
    assert all(len(r["per_head_token_density"]) == 3 for r in report["layers"])
    assert _is_png(png)


def test_inspect_dynamic_pattern_with_recorded_qk(tmp_path, capsys):
    layout = vs.VideoLayout(4, 4, 4)
    q, k = torch.randn(1, layout.seq_len, 2, 8), torch.randn(1, layout.seq_len, 2, 8)
    torch.save({"q": q, "k": k}, tmp_path / "qk.pt")
    argv = ["inspect", "--pattern", "vmoba", "--grid", "4x4x4", "--block-size", "16", "--layers", "1"]
    argv += ["--temporal-chunk", "2", "--qk", str(tmp_path / "qk.pt"), "--no-plot", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert "recorded" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    plan = vs.plan(vs.VMoBA(temporal_chunk=2), layout, num_heads=2, q=q, k=k, block_size=16)
    assert report["layers"][0]["token_density"] == pytest.approx(float(token_density(plan).mean()))
    assert main([*argv[:-2], "--qk", str(tmp_path / "missing.pt")]) == 2


@pytest.mark.parametrize(
    "pattern, layout",
    [
        (vs.Radial(block_size=16, decay_factor=0.5), vs.VideoLayout(6, 5, 7, text_len=9, text_position="after")),
        ("gna", vs.VideoLayout(5, 6, 7, text_len=5, text_position="before")),
        ("tile", vs.VideoLayout(5, 6, 7)),
        ("vmoba", vs.VideoLayout(5, 6, 7, text_len=5, text_position="before")),
    ],
)
def test_token_density_counts_exactly_the_token_mask(pattern, layout):
    if isinstance(pattern, str):
        options = {
            "gna": dict(kernel_size=(3, 3, 5)),
            "tile": dict(tile=(2, 2, 4), window=(3, 1, 1)),
            "vmoba": dict(temporal_chunk=2, spatial_chunk=(2, 3), st_chunk=(2, 2, 3)),
        }[pattern]
        pattern = vs.make_pattern(pattern, **options)
    for layer in range(3 if pattern.dynamic else 1):
        if pattern.dynamic:
            q, k = torch.randn(2, layout.seq_len, 2, 8), torch.randn(2, layout.seq_len, 2, 8)
            plan = vs.plan(pattern, layout, num_heads=2, layer=layer, q=q, k=k, block_size=16)
            mask = vs.token_mask(pattern, layout, q=q, k=k, layer=layer, block_size=16)  # [B, H, S, S]
            expected = mask.double().mean(dim=(0, 2, 3))
        else:
            plan = vs.plan(pattern, layout, layer=layer, block_size=16)
            expected = vs.token_mask(pattern, layout, layer=layer, block_size=16).double().mean(dim=(1, 2))
        assert torch.allclose(token_density(plan), expected, atol=1e-12)
        matrix = plan.dense_block_matrix()
        nvb = int((~plan.text_blocks).sum())
        if plan.query_select is None:
            assert float(video_block_density(plan)[0]) == pytest.approx(float((matrix[:nvb, :nvb] > 0).double().mean()))


def test_query_row_is_the_token_mask_row():
    pattern = vs.make_pattern("tile", tile=(2, 2, 4), window=(3, 1, 1))
    layout = vs.VideoLayout(5, 6, 7, text_len=3, text_position="before")
    plan = vs.plan(pattern, layout, block_size=16)
    mask = vs.token_mask(pattern, layout, block_size=16)[0]
    for index in (3, 17, layout.seq_len - 1):
        assert torch.equal(query_row(plan, index), mask[index])


def test_plots_for_tile_major_and_dynamic_plans(tmp_path):
    pattern = vs.make_pattern("tile", tile=(2, 2, 4), window=(3, 1, 1))
    plan = vs.plan(pattern, vs.VideoLayout(5, 6, 7), block_size=16)
    assert selection_matrix(plan) is None
    assert _is_png(plot_plan(plan, tmp_path / "tile.png", query=(2, 3, 3), title="tile"))
    layout = vs.VideoLayout(4, 4, 6)
    q = k = torch.randn(1, layout.seq_len, 1, 8)
    dyn = vs.plan(vs.VMoBA(temporal_chunk=2), layout, num_heads=1, q=q, k=k, block_size=16)
    sel = selection_matrix(dyn)
    assert sel.shape == (dyn.num_blocks, dyn.num_blocks) and sel.min() >= 0 and sel.max() <= 1
    assert _is_png(plot_plan(dyn, tmp_path / "dyn.png", query=(0, 0, 0)))
    with pytest.raises(ValueError, match=r"\.png"):
        plot_plan(plan, tmp_path / "x.jpg")
