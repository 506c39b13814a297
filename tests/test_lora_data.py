"""LoRA data side: dataset scan, clip reading, flow-matching pieces, latent/text cache, checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch

from vidsparse.lora import checkpoint as ckpt
from vidsparse.lora.cache import LatentCache
from vidsparse.lora.config import TrainConfig
from vidsparse.lora.data import ClipSpec, VideoReadError, read_clip, resize_cover_crop, scan_dataset
from vidsparse.lora.flow import NoiseSampler, add_noise, shift_sigmas
from vidsparse.lora.models import load_model
from vidsparse.lora.train import prepare_cache, sample_order

SPEC = ClipSpec(num_frames=17, height=48, width=48)
SMALL = ClipSpec(num_frames=9, height=32, width=32)  # cache tests: cheaper VAE encodes


def moving_ball(n, h, w, seed):
    """Frames of a coloured ball bouncing over a flat background: uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[:] = rng.integers(0, 80, 3)
    color, r = rng.integers(120, 256, 3), max(3, min(h, w) // 6)
    y, x = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
    vy, vx = (int(v) for v in rng.choice([-2, -1, 1, 2], 2))
    yy, xx = np.mgrid[:h, :w]
    for t in range(n):
        frames[t][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = color
        if not r <= y + vy < h - r:
            vy = -vy
        if not r <= x + vx < w - r:
            vx = -vx
        y, x = y + vy, x + vx
    return frames


def make_dataset(root, n_frames=20):
    """a.mp4 + a.txt, b.gif (caption in metadata.jsonl), c.webm + c.txt."""
    import imageio.v3 as iio

    root.mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "a.mp4", moving_ball(n_frames, 40, 56, 0), fps=8, macro_block_size=1)
    (root / "a.txt").write_text("a red ball bouncing\n")
    iio.imwrite(root / "b.gif", moving_ball(n_frames, 48, 48, 1), duration=100, loop=0)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "b.gif", "text": "a blue ball"}) + "\n")
    iio.imwrite(root / "c.webm", moving_ball(n_frames, 48, 64, 2), fps=8, codec="libvpx-vp9", macro_block_size=1)
    (root / "c.txt").write_text("a green ball")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def test_scan_dataset_captions_and_reports(tmp_path, dataset):
    root = tmp_path / "d"
    shutil.copytree(dataset, root)
    (root / "sub").mkdir()
    shutil.copy(root / "a.mp4", root / "sub" / "nocap.mp4")
    (root / ".vidsparse-cache").mkdir()
    shutil.copy(root / "a.mp4", root / ".vidsparse-cache" / "hidden.mp4")
    (root / "empty.gif").write_bytes((root / "b.gif").read_bytes())
    (root / "empty.txt").write_text("  \n")
    with open(root / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "gone.mp4", "caption": "x"}) + "\n")
    scan = scan_dataset(root)
    assert {s.relpath: s.caption for s in scan.samples} == {
        "a.mp4": "a red ball bouncing",
        "b.gif": "a blue ball",
        "c.webm": "a green ball",
    }
    reasons = dict(scan.skipped)
    assert "no caption" in reasons["sub/nocap.mp4"]
    assert reasons["empty.gif"] == "empty caption"
    assert "missing" in reasons["gone.mp4"]
    assert not any("hidden" in r for r in reasons)
    # metadata.csv works too, and a caption column without a file column is a clear error
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("file_name,prompt\nb.gif,csv caption\n")
    assert {s.relpath: s.caption for s in scan_dataset(root).samples}["b.gif"] == "csv caption"
    (root / "metadata.csv").write_text("name,prompt\nb.gif,x\n")
    with pytest.raises(ValueError, match="file column"):
        scan_dataset(root)
    with pytest.raises(ValueError, match="not a directory"):
        scan_dataset(tmp_path / "missing")


def test_read_clip_formats_and_errors(tmp_path, dataset):
    for name in ("a.mp4", "b.gif", "c.webm"):
        clip = read_clip(dataset / name, SPEC)
        assert clip.shape == (3, 17, 48, 48) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.05
    # the ball moves: consecutive frames differ, and frame stride 1 vs the source matches
    clip = read_clip(dataset / "b.gif", SPEC)
    assert (clip[:, 1] - clip[:, 0]).abs().max() > 0.1
    with pytest.raises(VideoReadError, match=r"b\.gif: has 20 frames, needs 33"):
        read_clip(dataset / "b.gif", ClipSpec(17, 48, 48, frame_stride=2))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x01not a video" * 100)
    with pytest.raises(VideoReadError, match=r"broken\.mp4: cannot be decoded"):
        read_clip(broken, SPEC)


def test_resize_cover_crop_keeps_center_and_aspect():
    frame = torch.zeros(1, 3, 40, 80)
    frame[..., 18:22, 38:42] = 1.0  # a centred square marker
    out = resize_cover_crop(frame, 32, 32)  # scale 0.8 -> 32x64, centre crop of 32 columns
    assert out.shape == (1, 3, 32, 32)
    ys, xs = torch.nonzero(out[0, 0] > 0.3, as_tuple=True)
    assert abs(ys.float().mean() - 15.5) < 1 and abs(xs.float().mean() - 15.5) < 1
    # the marker stays square: the aspect ratio is kept (no stretch)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1


def test_flow_matching_pieces():
    assert torch.equal(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 1.0), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    x0, noise = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    xs, target = add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xs[0], x0[0]) and torch.equal(xs[1], noise[1]) and torch.equal(target, noise - x0)
    xs, _ = add_noise(x0, noise, torch.tensor([0.25, 0.25]))
    assert torch.allclose(xs, 0.75 * x0 + 0.25 * noise)

    def draw(mode, shift):
        return NoiseSampler(mode).sample(4000, torch.Generator().manual_seed(0), shift)

    uni, logit, shifted = draw("uniform", 1.0), draw("logit_normal", 1.0), draw("shifted", 3.0)
    for s in (uni, logit, shifted):
        assert s.min() >= 1e-3 and s.max() <= 1.0
    assert abs(uni.mean() - 0.5) < 0.03 and abs(logit.mean() - 0.5) < 0.03 and logit.std() < uni.std()
    assert shifted.mean() > 0.6  # the shift moves mass to high noise
    assert torch.equal(draw("uniform", 1.0), uni)  # reproducible from the generator
    assert NoiseSampler("shifted").resolved_shift(5.0) == 5.0 and NoiseSampler("uniform").resolved_shift(5.0) == 1.0
    assert NoiseSampler("uniform", shift=2.0).resolved_shift(5.0) == 2.0
    with pytest.raises(ValueError, match="timestep_sampling"):
        NoiseSampler("cosine")
    with pytest.raises(ValueError, match="shift"):
        NoiseSampler("shifted", shift=0.0)


def test_sample_order_is_a_reshuffle_per_epoch():
    n = 7
    epochs = [[sample_order(n, 3, e * n + i) for i in range(n)] for e in range(3)]
    for e, picks in enumerate(epochs):
        assert sorted(i for i, _ in picks) == list(range(n)) and {ep for _, ep in picks} == {e}
    assert [i for i, _ in epochs[0]] != [i for i, _ in epochs[1]]
    assert sample_order(n, 3, 12) == epochs[1][5]
    assert [sample_order(n, 4, i)[0] for i in range(n)] != [i for i, _ in epochs[0]]


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.safetensors")}


def test_cache_reuse_and_invalidation(tmp_path, dataset, tiny):
    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    cache = LatentCache(tmp_path / "cache")
    samples = scan_dataset(data).samples
    first = cache.prepare(samples, SMALL, tiny, progress=False)
    assert (first.latents_computed, first.text_computed, len(first.samples)) == (3, 3, 3)
    from vidsparse.lora.cache import load_latents, load_text

    z = load_latents(first.samples[0].latent_file)
    assert z.shape == (4, 3, 4, 4)  # 9 frames -> 3 latent frames, 32 px -> 4 latents
    assert load_text(first.samples[0].text_file)["prompt_embeds"].shape == (8, 16)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["latents"]) == 3 and {v["video"] for v in manifest["latents"].values()} == {
        "a.mp4",
        "b.gif",
        "c.webm",
    }

    again = cache.prepare(samples, SMALL, tiny, progress=False)
    assert (again.latents_computed, again.text_computed) == (0, 0)
    assert (again.latents_reused, again.text_reused) == (3, 3)
    assert [s.latent_file for s in again.samples] == [s.latent_file for s in first.samples]

    # a different frame count re-encodes every latent but reuses every text embedding
    shorter = cache.prepare(samples, ClipSpec(5, 32, 32), tiny, progress=False)
    assert (shorter.latents_computed, shorter.text_computed, shorter.text_reused) == (3, 0, 3)
    # a changed caption re-encodes only its text; an edited video only its latents
    (data / "c.txt").write_text("a yellow ball")
    import imageio.v3 as iio

    iio.imwrite(data / "a.mp4", moving_ball(20, 40, 56, 9), fps=8, macro_block_size=1)
    changed = cache.prepare(scan_dataset(data).samples, SMALL, tiny, progress=False)
    assert (changed.latents_computed, changed.latents_reused) == (1, 2)
    assert (changed.text_computed, changed.text_reused) == (1, 2)


def test_corrupt_video_is_skipped_and_cache_kept(tmp_path, dataset, tiny, caplog):
    data = tmp_path / "d"
    shutil.copytree(dataset, data)
    cfg = TrainConfig(
        data_dir=str(data),
        output_dir=str(tmp_path / "out"),
        num_frames=9,
        height=32,
        width=32,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    prepare_cache(cfg, tiny, device=torch.device("cpu"))
    before = _snapshot(tmp_path / "cache")
    (data / "broken.mp4").write_bytes(b"\x00garbage" * 200)
    (data / "broken.txt").write_text("never decodes")
    with caplog.at_level("WARNING", logger="vidsparse"):
        report = prepare_cache(cfg, tiny, device=torch.device("cpu"))
    assert dict(report.skipped)["broken.mp4"].startswith("cannot be decoded")
    assert "broken.mp4" in caplog.text
    assert (report.latents_computed, report.latents_reused, len(report.samples)) == (0, 3, 3)
    after = _snapshot(tmp_path / "cache")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing cached was lost or changed
    assert set(after) == set(before) and report.text_computed == 0  # not even its caption: nothing uses it

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(data / "broken.mp4", only_bad / "broken.mp4")
    shutil.copy(data / "broken.txt", only_bad / "broken.txt")
    bad_cfg = TrainConfig(
        data_dir=str(only_bad),
        output_dir=str(tmp_path / "o2"),
        num_frames=9,
        height=32,
        width=32,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"No usable training videos.*broken\.mp4: cannot be decoded"):
        prepare_cache(bad_cfg, tiny, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="4k \\+ 1"):
        prepare_cache(
            TrainConfig(data_dir=str(data), output_dir="o", num_frames=16, height=32, width=32),
            tiny,
            device=torch.device("cpu"),
        )


def test_distributed_cache_shares_do_not_depend_on_timing(tmp_path, dataset, tiny):
    """Each rank's share is fixed by the sample list, not by which files exist when it looks."""
    cache = LatentCache(tmp_path / "cache")
    samples = scan_dataset(dataset).samples
    ahead = cache.prepare(samples, SMALL, tiny, rank=1, world_size=2, progress=False)  # runs ahead of rank 0
    assert (ahead.latents_computed, ahead.text_computed) == (1, 1)
    late = cache.prepare(samples, SMALL, tiny, rank=0, world_size=2, progress=False)
    assert (late.latents_computed, late.text_computed) == (2, 2)
    assert len(late.samples) == 3 and not late.skipped


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)

    def save(step):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        return ckpt.save_checkpoint(
            tmp_path,
            step,
            lora_state={"w": model.weight.detach().clone()},
            optimizer=opt,
            lr_scheduler=sched,
            generator=gen,
            state={"config": {}},
            keep=2,
        )

    good = save(3)
    good_bytes = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ckpt.torch_save

    def failing(dest, obj):
        if dest.name == "optimizer.pt":
            raise OSError("disk full")
        real(dest, obj)

    monkeypatch.setattr(ckpt, "torch_save", failing)
    with pytest.raises(OSError, match="disk full"):
        save(6)
    monkeypatch.setattr(ckpt, "torch_save", real)
    assert not list(tmp_path.glob(".tmp-*"))  # a failed save removes its incomplete folder at once
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert ckpt.resolve_resume("latest", tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_bytes
    # the next save cleans a temp folder a killed save left; keep=2 prunes the oldest
    (tmp_path / ".tmp-checkpoint-00000005").mkdir()
    save(6)
    save(9)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 9]
    assert not list(tmp_path.glob(".tmp-*"))
    # a restored RNG state replays the same draws
    gen2 = torch.Generator().manual_seed(123)
    state, lora = ckpt.load_checkpoint(
        tmp_path / ckpt.checkpoint_name(9), optimizer=opt, lr_scheduler=sched, generator=gen2
    )
    assert state["step"] == 9 and set(lora) == {"w"}
    assert torch.equal(torch.rand(3, generator=gen2), torch.rand(3, generator=gen))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ValueError, match="this run has 2"):
        ckpt.load_checkpoint(
            tmp_path / ckpt.checkpoint_name(9), optimizer=opt, lr_scheduler=sched, generator=gen2, world_size=2
        )
    # numpy's and python's streams come back too
    import random

    import numpy as np

    np.random.seed(5)
    random.seed(5)
    ckpt.save_checkpoint(
        tmp_path, 12, lora_state={"w": torch.ones(1)}, optimizer=opt, lr_scheduler=sched, generator=gen, state={}
    )
    expected = (np.random.rand(2), random.random())
    ckpt.load_checkpoint(tmp_path / ckpt.checkpoint_name(12), optimizer=opt, lr_scheduler=sched, generator=gen2)
    assert np.array_equal(np.random.rand(2), expected[0]) and random.random() == expected[1]
    # a checkpoint holding arbitrary pickled objects is refused, never unpickled
    torch.save({"evil": ValueError("runs code")}, tmp_path / ckpt.checkpoint_name(12) / "optimizer.pt")
    with pytest.raises(ValueError, match="Refusing to resume .* could run code"):
        ckpt.load_checkpoint(tmp_path / ckpt.checkpoint_name(12), optimizer=opt, lr_scheduler=sched, generator=gen2)


def test_train_config_rejects_bad_values():
    base = dict(data_dir="d", output_dir="o")
    for kwargs, match in (
        (dict(rank=0), "rank"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(timestep_sampling="cosine"), "timestep_sampling"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=()), "target_modules"),
        (dict(dense_layers=-1), "dense_layers"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**base, **kwargs)
    assert TrainConfig(**base, rank=16).lora_alpha == 16.0


def test_cli_flags_build_the_config():
    from vidsparse.cli import build_parser
    from vidsparse.lora import cli

    parser, subs = build_parser("train-lora")
    cli.add_arguments(subs["train-lora"])
    args = parser.parse_args(
        [
            "train-lora",
            "--model",
            "tiny-random",
            "--data-dir",
            "d",
            "--output-dir",
            "o",
            "--num-frames",
            "33",
            "--pattern",
            "radial",
            "--decay-factor",
            "0.5",
            "--dense-layers",
            "0-1,-1",
            "--target-modules",
            "attn1.to_q, attn1.to_v",
            "--resume",
            "--checkpoints-total-limit",
            "0",
            "--lr",
            "3e-4",
        ]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.num_frames, cfg.pattern, dict(cfg.pattern_options)) == (33, "radial", {"decay_factor": 0.5})
    assert cfg.dense_layers == (-1, 0, 1) and cfg.target_modules == ("attn1.to_q", "attn1.to_v")
    assert (cfg.resume, cfg.checkpoints_total_limit, cfg.learning_rate) == ("latest", None, 3e-4)
    assert cli.parse_layers("none") == ()
    with pytest.raises(ValueError, match="--dense-layers expects"):
        cli.parse_layers("first")
