"""LoRA training end to end on the tiny Wan pipeline: loss, exact resume, diffusers loading, CLI.

One short run (through ``vidsparse train-lora``) trains under the radial pattern with the torch
reference backend; the other tests reuse its output.
"""

import json
import shutil

import pytest
import torch
from test_lora_data import make_dataset

from vidsparse.config import SparseConfig
from vidsparse.lora import TrainConfig, load_lora, read_lora_info, train_lora
from vidsparse.lora.cache import LatentCache, load_latents, load_text
from vidsparse.lora.data import ClipSpec, scan_dataset
from vidsparse.lora.models import load_model
from vidsparse.lora.sparse import enable_gradient_checkpointing, sparse_config
from vidsparse.lora.train import flow_loss
from vidsparse.models.tiny import build_tiny_pipeline, encode_prompt_tiny, run_tiny_pipeline
from vidsparse.pipelines import apply, get_state

# LoRA training runs: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 4
FLAGS = dict(
    num_frames=17,
    height=48,
    width=48,
    rank=8,
    learning_rate=2e-2,
    max_train_steps=STEPS,
    checkpointing_steps=EVERY,
    mixed_precision="no",
    attention_backend="torch",
    pattern="radial",
    seed=1,
    progress=False,
    log_every=4,
)


def _argv(cfg: dict, data, out, cache):
    argv = [
        "train-lora",
        "--model",
        "tiny-random",
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]
    for key, value in cfg.items():
        if key == "progress":
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run A: the uninterrupted run, through the command line."""
    from vidsparse.cli import main

    root = tmp_path_factory.mktemp("lora")
    data = make_dataset(root / "data")
    out = root / "run_a"
    rc = main(_argv(FLAGS, data, out, root / "cache"))
    assert rc == 0
    return root, data, out


def _lora_file(out):
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_lora_checkpoints_and_metrics(run):
    _, _, out = run
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["lr"] == pytest.approx(2e-2) and r["loss"] > 0 for r in rows)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000008"]
    info = read_lora_info(out)
    assert info["num_frames"] == 17 and info["rank"] == 8 and info["pattern"].startswith("radial")
    sd = _lora_file(out)
    assert len(sd) == 2 * 4 * 2  # 2 blocks x (q, k, v, o) x (A, B)
    assert all(k.startswith("transformer.blocks.") and ".attn1." in k for k in sd)
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)  # B starts at zero: it trained


def _eval_loss(transformer, samples, adapter):
    """Flow loss on fixed noise levels and noise (the same for every model compared)."""
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for s in samples:
            x0 = load_latents(s.latent_file)[None]
            text = {k: v[None] for k, v in load_text(s.text_file).items()}
            for sigma in (0.3, 0.6, 0.9):
                noise = torch.randn(x0.shape, generator=gen)
                total += float(flow_loss(adapter, transformer, x0, text, torch.tensor([sigma]), noise))
    return total / (3 * len(samples))


def test_loss_decreases_and_lora_loads_into_pipeline(run):
    root, data, out = run
    cfg = TrainConfig(data_dir=str(data), output_dir=str(out), **FLAGS)
    adapter = load_model("tiny-random")
    samples = (
        LatentCache(root / "cache")
        .prepare(scan_dataset(data).samples, ClipSpec(17, 48, 48), adapter, progress=False)
        .samples
    )
    pipe = adapter.pipe
    apply(pipe.transformer, sparse_config(cfg))  # the objective trained
    before = _eval_loss(pipe.transformer, samples, adapter)
    latents_before = run_tiny_pipeline(pipe, num_frames=17, height=48, width=48, num_inference_steps=2)

    name = load_lora(pipe, out)  # pipe.load_lora_weights under the hood
    assert name in pipe.get_list_adapters()["transformer"]
    after = _eval_loss(pipe.transformer, samples, adapter)
    latents_after = run_tiny_pipeline(pipe, num_frames=17, height=48, width=48, num_inference_steps=2)
    assert after < 0.95 * before, (before, after)  # deterministic: 1.214 -> 1.091 on CPU
    assert (latents_after - latents_before).abs().max() > 1e-3  # the LoRA changes the output

    # plain diffusers loading (no vidsparse) gives the same adapter weights as the file
    fresh = build_tiny_pipeline(0)
    fresh.load_lora_weights(str(out))
    loaded = {k: v for k, v in fresh.transformer.state_dict().items() if "lora_" in k}
    saved = _lora_file(out)
    for key, value in saved.items():
        peft_key = key.removeprefix("transformer.").replace(".weight", ".default_0.weight")
        assert torch.equal(loaded[peft_key], value), key
    with pytest.raises(ValueError, match="does not exist"):
        load_lora(fresh, root / "missing")


def test_vidsparse_generate_loads_the_lora(run):
    from vidsparse.generation import GenerateOptions, generate

    _, _, out = run
    opts = dict(model="tiny-random", frames=17, height=48, width=48, steps=2, backend="torch", progress=False)
    base = generate(GenerateOptions(**opts)).frames
    tuned = generate(GenerateOptions(**opts, lora=str(out))).frames
    assert base.shape == tuned.shape and (base.astype(int) - tuned.astype(int)).__abs__().max() > 0


def test_resume_reproduces_the_uninterrupted_run(run):
    root, data, out = run
    out_b = root / "run_b"
    out_b.mkdir()
    shutil.copytree(out / "checkpoint-00000004", out_b / "checkpoint-00000004")
    # an interrupted run may have logged past its last checkpoint: those rows are dropped on resume
    rows_a = _metrics(out)
    (out_b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_a[:6]) + '{"step": 7, "lo')
    cfg = TrainConfig(
        data_dir=str(data), output_dir=str(out_b), cache_dir=str(root / "cache"), resume="latest", **FLAGS
    )
    result = train_lora(cfg)
    assert (result.start_step, result.final_step, len(result.losses)) == (EVERY, STEPS, STEPS - EVERY)
    assert result.cache.latents_computed == 0 and result.cache.text_computed == 0  # cache reused
    a, b = _lora_file(out), _lora_file(out_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    rows_b = _metrics(out_b)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows_b[EVERY:]] == pytest.approx([r["loss"] for r in rows_a[EVERY:]], abs=1e-6)

    changed = TrainConfig(
        data_dir=str(data),
        output_dir=str(out_b),
        cache_dir=str(root / "cache"),
        resume="latest",
        **{**FLAGS, "rank": 4},
    )
    with pytest.raises(ValueError, match=r"settings differ.*rank: checkpoint 8, now 4"):
        train_lora(changed)


def test_gradient_checkpointing_recomputes_the_sparse_pattern():
    """Recomputed blocks see the forward's pattern: same output and gradients as without checkpointing."""
    from peft import LoraConfig

    def grads(checkpointing, pattern):
        pipe = build_tiny_pipeline(0)
        tr = pipe.transformer.requires_grad_(False)
        torch.manual_seed(0)
        tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn1.to_q", "attn1.to_v", "attn1.to_out.0"]))
        with torch.no_grad():
            for p in tr.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        apply(tr, SparseConfig(pattern, dense_first_steps=0, dense_layers=(), backend="torch"))
        if checkpointing:
            enable_gradient_checkpointing(tr)
        tr.train()
        x = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(1))
        out = tr(x, torch.tensor([500.0, 300.0]), encode_prompt_tiny("hi", dim=16, batch=2), return_dict=False)[0]
        out.square().mean().backward()
        calls = get_state(tr).calls["sparse"]
        return out.detach(), [p.grad for p in tr.parameters() if p.requires_grad], calls

    out, g, calls = grads(False, "radial")
    out_ck, g_ck, calls_ck = grads(True, "radial")
    out_dense, g_dense, _ = grads(False, "dense")
    assert calls_ck == 2 * calls  # the recomputation went through vidsparse again
    torch.testing.assert_close(out_ck, out, rtol=0, atol=1e-6)
    for a, b in zip(g, g_ck):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert (out - out_dense).abs().max() > 1e-3  # radial is really active (not dense) on this grid
    assert max((a - b).abs().max() for a, b in zip(g, g_dense)) > 1e-6


@pytest.fixture
def no_model_load(monkeypatch):
    """train_lora fails the test if it gets as far as loading the model."""
    import vidsparse.lora.train as train

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for settings that are refused")

    monkeypatch.setattr(train, "load_model", refuse)


def test_attention_backend_that_cannot_run_is_refused_before_loading(tmp_path, no_model_load):
    out = tmp_path / "o"
    cfg = TrainConfig(
        data_dir=str(make_dataset(tmp_path / "data")),
        output_dir=str(out),
        **{**FLAGS, "max_train_steps": 1, "attention_backend": "triton", "mixed_precision": "bf16"},
    )
    # the tests run Triton's interpreter, which refuses bf16 (bf16 mixed precision: bf16 attention)
    with pytest.raises(ValueError, match=r"--attention-backend triton cannot run on cpu \(bfloat16\)"):
        train_lora(cfg)
    assert not out.exists()


def test_unwritable_cache_dir_is_refused_before_the_output_folder_and_the_model(tmp_path, no_model_load):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "o"
    data = make_dataset(tmp_path / "data")
    cfg = TrainConfig(data_dir=str(data), output_dir=str(out), cache_dir=str(tmp_path / "a-file" / "c"), **FLAGS)
    with pytest.raises(ValueError, match=r"Cannot write --cache-dir .*a-file' is a file, not a directory"):
        train_lora(cfg)
    assert not out.exists()


def test_train_lora_rejects_bad_targets_and_models(tmp_path, run):
    _, data, _ = run
    cfg = TrainConfig(
        data_dir=str(data),
        output_dir=str(tmp_path / "o"),
        cache_dir=str(tmp_path / "c"),
        **{**FLAGS, "max_train_steps": 1},
        target_modules=("attn9.to_q",),
    )
    with pytest.raises(ValueError, match=r"attn9\.to_q.*match no module"):
        train_lora(cfg)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_lora(TrainConfig(data_dir=str(data), output_dir=str(tmp_path / "o"), resume=str(tmp_path / "x"), **FLAGS))
