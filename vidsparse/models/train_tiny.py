"""Train the tiny demonstration model on the synthetic world (``vidsparse.models.synthetic_world``).

    python -m vidsparse.models.train_tiny --out vidsparse/models/weights/tiny --seed 0

Three stages, all on the CPU, reproducible from ``--seed``:

1. VAE (``TinyVideoVAE``): reconstruction (MSE + L1) plus a small KL term, on random crops of
   freshly rendered clips (it is convolutional, so crops teach it the full frame).
2. Latents: every training clip (trained caption combinations x backgrounds x jittered copies)
   is encoded once; the per-channel mean / std become the VAE's ``latents_mean`` / ``latents_std``,
   as Wan's VAE config carries them, so the transformer sees unit-scale latents.
3. Transformer + text encoder (``WanTransformer3DModel`` and a tiny ``UMT5EncoderModel``) with the
   flow-matching objective of ``vidsparse train-lora`` (``vidsparse.lora.flow``: ``x_s = (1 - s) x0
   + s noise``, target ``noise - x0``, shifted noise levels); captions are dropped to the empty
   prompt ``--cfg-dropout`` of the time so classifier-free guidance works. Prompt embeddings are
   shaped exactly as ``WanPipeline.encode_prompt`` shapes them (valid tokens, then zeros up to
   ``max_sequence_length``).

The pipeline is saved (fp16) into a temporary folder beside ``--out``, reloaded through
``WanPipeline.from_pretrained`` to record ``reference.json``, and only then renamed to ``--out``,
so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vidsparse.models import synthetic_world as world

#: What ``WanPipeline.encode_prompt`` pads prompt embeddings to (its ``max_sequence_length`` default).
PIPE_TEXT_LEN = 512
#: Tokens a caption of the grammar can take (the longest is 9 words + ``</s>``).
CAPTION_TOKENS = 16
FLOW_SHIFT = 3.0
VAE_LR = 1e-3
OBJECT_WEIGHT = 20.0
REFERENCE_PROMPT = "a red ball bouncing"


@dataclass
class TrainTinyConfig:
    """One training run. The defaults are the shipped model's run (about 30 min on 2 CPU cores)."""

    out: Path
    seed: int = 0
    variants: int = 4  # jittered clips per (trained combination, background)
    vae_steps: int = 800
    vae_batch: int = 4  # 5-frame clips (2 latent frames) per VAE step
    steps: int = 12000  # transformer steps
    batch: int = 8
    lr: float = 3e-3
    # Noise-level shift of training (the scheduler samples with FLOW_SHIFT): where the video's
    # layout, hence its motion, is decided is the high-noise end.
    train_shift: float = 8.0
    warmup: int = 100
    cfg_dropout: float = 0.1
    frames: int = world.TRAIN_FRAMES
    height: int = world.HEIGHT
    width: int = world.WIDTH
    # One thread: on a CPU shared with other jobs, two threads ran a step 50x slower than one (each
    # parallel region waits for the descheduled thread); pass 2 on an idle 2-core machine.
    threads: int | None = 1
    log_every: int = 50

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("variants", "vae_steps", "vae_batch", "steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if (self.frames - 1) % 4 or self.height % 16 or self.width % 16:
            raise ValueError(
                f"frames must be 1 + 4k and height / width multiples of 16 (VAE 4x / 8x, patch 2); "
                f"got {self.frames} frames of {self.height}x{self.width}."
            )
        if not self.train_shift > 0:
            raise ValueError(f"train_shift must be > 0 (1 = no shift), got {self.train_shift}.")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")


def transformer_config(z_dim: int, text_dim: int) -> dict[str, Any]:
    """The tiny transformer's config: 4 layers of 4 heads of 32 (width 128), FFN 512.

    Width 128, not 64: a token's patch is 16 latent channels x 2 x 2 = 64 numbers, and at high noise
    the model must carry that noise through to its output (the velocity is noise - x0) besides
    computing the video; at width 64 there was no room left (its prediction at pure noise kept
    0.88 of the noise and almost none of the caption's mean video). Head 32, not 16: RoPE then has
    5 frequencies per spatial axis instead of 2.
    """
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


Z_DIM = 16
TEXT_DIM = 32


def _lr(step: int, cfg: TrainTinyConfig, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pixels(clips: list[np.ndarray]) -> torch.Tensor:
    """float [F, H, W, 3] in [0, 1] clips -> [B, 3, F, H, W] in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) * 2 - 1


def _random_scene(rng: np.random.Generator) -> world.Scene:
    triples = world.combinations(held_out=False)
    c, s, m = triples[int(rng.integers(len(triples)))]
    bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
    return world.Scene(c, s, m, bg, tuple(float(v) for v in rng.random(4)), float(rng.random()))


def train_vae(cfg: TrainTinyConfig, log) -> Any:
    from vidsparse.models.tiny_vae import TinyVideoVAE

    torch.manual_seed(cfg.seed)
    vae = TinyVideoVAE(z_dim=Z_DIM)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        # Each latent frame is coded on its own, so 5-frame clips (a first frame, then a group of 4;
        # the whole motion sampled sparsely) teach it what the full clips hold, at a third of the cost.
        px = _pixels([world.render(_random_scene(rng), 5, cfg.height, cfg.width) for _ in range(cfg.vae_batch)])
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = VAE_LR * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        dist = vae.encode(px).latent_dist
        rec = vae.decode(dist.sample()).sample
        # The shape covers a few percent of the picture: weighted like the background, a VAE learns
        # the grey background alone. Saturated (object) pixels weigh OBJECT_WEIGHT times more.
        sat = px.amax(1, keepdim=True) - px.amin(1, keepdim=True)
        weight = 1.0 + OBJECT_WEIGHT * (sat > 0.4).float()
        err = rec - px
        loss_rec = ((err * err + 0.5 * err.abs()) * weight).mean() / weight.mean()
        kl = dist.kl().mean() / (Z_DIM * dist.mean[0, 0].numel())
        loss = loss_rec + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(
                f"vae step {step}/{cfg.vae_steps} rec {loss_rec.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)"
            )
    return vae.eval()


@torch.no_grad()
def vae_reconstruction_check(vae, cfg: TrainTinyConfig, n: int = 12) -> dict[str, Any]:
    """Encode and decode ``n`` fresh clips (all held-out combinations included): how many does
    ``check_prompt`` still read right, and the mean PSNR. The VAE bounds what the model can show."""
    rng = np.random.default_rng(cfg.seed + 7)
    triples = list(world.HELD_OUT) + world.combinations(held_out=False)
    passed, psnrs = 0, []
    for i in range(n):
        c, s, m = triples[i * len(triples) // n]
        bg = world.BACKGROUNDS[i % len(world.BACKGROUNDS)]
        scene = world.Scene(c, s, m, bg, tuple(float(v) for v in rng.random(4)), float(rng.random()))
        clip = world.render(scene, cfg.frames, cfg.height, cfg.width)
        rec = vae.decode(vae.encode(_pixels([clip])).latent_dist.mode()).sample
        rec = ((rec[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) / 2).numpy()
        passed += world.check_prompt(rec, scene.caption).passed
        psnrs.append(-10 * math.log10(max(float(((rec - clip) ** 2).mean()), 1e-10)))
    return {"n": n, "passed": passed, "psnr_db": round(float(np.mean(psnrs)), 2)}


@torch.no_grad()
def encode_dataset(vae, cfg: TrainTinyConfig, log) -> tuple[torch.Tensor, list[str]]:
    """Normalised latents [N, z, f, h, w] and captions of every training clip; sets the VAE's stats."""
    scenes = world.training_scenes(cfg.variants, seed=cfg.seed)
    latents = []
    for i in range(0, len(scenes), 16):
        px = _pixels([world.render(s, cfg.frames, cfg.height, cfg.width) for s in scenes[i : i + 16]])
        latents.append(vae.encode(px).latent_dist.mode())
    z = torch.cat(latents)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    log(f"encoded {len(scenes)} clips to latents {tuple(z.shape[1:])}")
    return (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), [s.caption for s in scenes]


def pipeline_embeddings(
    text_encoder, ids: torch.Tensor, mask: torch.Tensor, length: int = PIPE_TEXT_LEN
) -> torch.Tensor:
    """Prompt embeddings as ``WanPipeline._get_t5_prompt_embeds`` builds them: the encoder's output
    on the valid tokens, zeros after them, ``length`` long (the pipeline's is ``PIPE_TEXT_LEN``)."""
    hidden = text_encoder(ids, mask).last_hidden_state * mask[..., None].to(text_encoder.dtype)
    return F.pad(hidden, (0, 0, 0, length - hidden.shape[1]))


class CollapsedPadCrossAttention:
    """Wan cross-attention over short prompt embeddings, equal to the pipeline's 512-long ones.

    The pipeline pads every prompt with zeros to ``PIPE_TEXT_LEN`` tokens; all of them project to
    the same key and value, so attending to ``PIPE_TEXT_LEN - n`` copies is attending to the
    ``L - n`` zero rows of an ``L``-long embedding with ``log((PIPE_TEXT_LEN - n) / (L - n))`` added
    to their logits. Training uses ``L = CAPTION_TOKENS``: the same function at a fraction of the
    cost (``test_train_tiny`` checks the equality against the 512-long call). Set ``bias`` [B, L]
    before each forward. Training only: generation runs diffusers' own processor.
    """

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None

    @staticmethod
    def pad_bias(mask: torch.Tensor, full: int = PIPE_TEXT_LEN) -> torch.Tensor:
        """[B, L] additive logits for a [B, L] valid-token mask standing for ``full``-long padding."""
        length = mask.shape[1]
        n = mask.sum(1, keepdim=True).float()
        pad = torch.log((full - n) / (length - n).clamp_min(1))
        return torch.where(mask.bool(), torch.zeros_like(pad), pad)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        bias = self.bias[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out.type_as(q)))


def collapse_cross_attention(transformer) -> CollapsedPadCrossAttention:
    """Give every block's ``attn2`` one shared ``CollapsedPadCrossAttention``; returns it."""
    proc = CollapsedPadCrossAttention()
    for block in transformer.blocks:
        block.attn2.set_processor(proc)
    return proc


def train_transformer(latents: torch.Tensor, captions: list[str], cfg: TrainTinyConfig, log):
    from vidsparse.lora.flow import NoiseSampler, add_noise
    from vidsparse.models.tiny_text import build_text_encoder, build_tokenizer
    from vidsparse.models.tiny_wan_model import TinyWanTransformer3DModel

    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed + 1)
    text_encoder = build_text_encoder(TEXT_DIM, len(tokenizer))
    transformer = TinyWanTransformer3DModel(**transformer_config(Z_DIM, TEXT_DIM))
    tok = tokenizer(captions + [""], padding="max_length", max_length=CAPTION_TOKENS, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    empty = len(captions)
    cross = collapse_cross_attention(transformer)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sampler = NoiseSampler(mode="shifted", shift=cfg.train_shift)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    transformer.train()
    text_encoder.train()
    t0, running = time.time(), []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg, cfg.steps)
        idx = torch.randint(len(captions), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        text_idx = torch.where(drop, torch.full_like(idx, empty), idx)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sampler.sample(cfg.batch, gen, sampler.resolved_shift(cfg.train_shift))
        noisy, target = add_noise(x0, noise, sigma)
        emb = pipeline_embeddings(text_encoder, ids[text_idx], mask[text_idx], CAPTION_TOKENS)
        cross.bias = CollapsedPadCrossAttention.pad_bias(mask[text_idx])
        pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(f"step {step}/{cfg.steps} loss {np.mean(running):.4f} lr {_lr(step, cfg, cfg.steps):.2e} "
                f"({time.time() - t0:.0f} s)")  # fmt: skip
            running = []
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for block in transformer.blocks:  # back to diffusers' processor for saving and generation
        block.attn2.set_processor(WanAttnProcessor())
    return transformer.eval(), text_encoder.eval(), tokenizer


def assemble(transformer, vae, text_encoder, tokenizer):
    """The ``WanPipeline`` of the trained parts (flow-matching Euler scheduler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_generation(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Generate the reference prompt with the saved weights (the real loading path) and fingerprint it."""
    from vidsparse.models.tiny_trained import TRAINED_DEFAULTS, load_trained_tiny, thumbnail

    pipe = load_trained_tiny(torch.float32, folder)
    d = TRAINED_DEFAULTS
    frames = pipe(
        prompt=REFERENCE_PROMPT,
        num_frames=d["frames"],
        height=d["height"],
        width=d["width"],
        num_inference_steps=d["steps"],
        guidance_scale=d["guidance"],
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]
    check = world.check_prompt(frames, REFERENCE_PROMPT)
    return {
        "prompt": REFERENCE_PROMPT,
        "seed": seed,
        **{k: d[k] for k in ("frames", "height", "width", "steps", "guidance")},
        "thumbnail": thumbnail(frames),
        "check": check.as_dict(),
    }


def train(cfg: TrainTinyConfig, log=print) -> dict[str, Any]:
    """Run the three stages and write the pipeline folder to ``cfg.out`` (atomically replaced)."""
    from vidsparse.atomic import fsync_dir, write_json
    from vidsparse.models.tiny_trained import REFERENCE_FILE

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cpu0, wall0 = time.process_time(), time.time()
    vae = train_vae(cfg, log)
    vae_check = vae_reconstruction_check(vae, cfg)
    log(f"vae check: {vae_check['passed']}/{vae_check['n']} reconstructed clips read back right, "
        f"PSNR {vae_check['psnr_db']} dB")  # fmt: skip
    latents, captions = encode_dataset(vae, cfg, log)
    transformer, text_encoder, tokenizer = train_transformer(latents, captions, cfg, log)
    pipe = assemble(transformer, vae, text_encoder, tokenizer).to(torch.float16)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", dir=cfg.out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        ref = reference_generation(tmp)
        meta = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "out"},
            "vae_check": vae_check,
            "train_wall_s": round(time.time() - wall0, 1),
            "train_cpu_s": round(time.process_time() - cpu0, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "held_out": [list(t) for t in world.HELD_OUT],
        }
        write_json(tmp / REFERENCE_FILE, ref)
        write_json(tmp / "training.json", meta)
        if cfg.out.exists():
            old = cfg.out.with_name(f".{cfg.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cfg.out, old)
            os.replace(tmp, cfg.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, cfg.out)
        fsync_dir(cfg.out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {cfg.out} ({meta['train_wall_s']} s wall, {meta['train_cpu_s']} s CPU); reference check: "
        f"{json.dumps(ref['check']['read'])}")  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidsparse.models.train_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="pipeline folder to write (replaced atomically)")
    d = TrainTinyConfig(out=Path("."))
    for name, help_ in (
        ("seed", "seed of every random draw"),
        ("variants", "jittered clips per trained combination and background"),
        ("vae-steps", "VAE training steps"),
        ("steps", "transformer training steps"),
        ("batch", "clips per transformer step"),
        ("threads", "torch CPU threads"),
        ("log-every", "log every N steps"),
    ):
        attr = name.replace("-", "_")
        parser.add_argument(
            f"--{name}", type=int, default=getattr(d, attr), help=f"{help_} (default {getattr(d, attr)})"
        )
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument(
        "--train-shift",
        type=float,
        default=d.train_shift,
        help=f"noise-level shift of training (default {d.train_shift})",
    )
    args = parser.parse_args(argv)
    try:
        cfg = TrainTinyConfig(
            out=args.out, seed=args.seed, variants=args.variants, vae_steps=args.vae_steps, steps=args.steps,
            batch=args.batch, lr=args.lr, train_shift=args.train_shift, threads=args.threads, log_every=args.log_every,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    train(cfg, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
