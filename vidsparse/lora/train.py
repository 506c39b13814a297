"""The LoRA training loop: the family's objective under the sparse pattern, with exact resume.

The objective is the adapter's (``TrainableVideoModel.sample_levels`` / ``training_inputs``):
flow matching as below for every family but CogVideoX (v-prediction on integer timesteps).

One optimizer step on each process: ``gradient_accumulation_steps`` micro-batches of
``batch_size`` cached clips; for each, a noise level ``s`` and Gaussian noise from the trainer's
own generator, ``x_s = (1 - s) x0 + s noise``, the transformer's prediction at timestep
``1000 s`` (the sparse pattern active in its self-attention) regressed onto ``noise - x0``.
Only the LoRA weights train; the base model stays frozen (in bf16 under mixed precision).

Exact resume: the sample order is a pure function of (seed, global sample index)
(``sample_order``), and every other source of randomness (noise, noise levels, LoRA dropout)
comes from RNG states saved in the checkpoint, so a run resumed from step k makes the same
updates as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vidsparse.atomic import atomic_path, write_json
from vidsparse.kernels.backends import check_runs_on
from vidsparse.lora.cache import (
    CachedSample,
    CacheReport,
    LatentCache,
    load_clip_conditioning,
    load_latents,
    load_text,
)
from vidsparse.lora.checkpoint import list_checkpoints, load_checkpoint, read_state, resolve_resume, save_checkpoint
from vidsparse.lora.config import RESUME_KEYS, TrainConfig
from vidsparse.lora.data import VIDEO_FORMATS, ClipSpec, scan_dataset
from vidsparse.lora.export import INFO_NAME, save_lora, unwrap
from vidsparse.lora.flow import NoiseSampler
from vidsparse.lora.models import (
    TrainableVideoModel,
    check_clip_size,
    check_condition_frames,
    check_trainable,
    load_model,
)
from vidsparse.lora.sparse import enable_gradient_checkpointing, enable_sparse, pattern_report

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DEFAULT_CACHE_DIRNAME = ".vidsparse-cache"


@dataclass
class TrainResult:
    """What a run produced: the LoRA file, the last step, this run's losses and the cache report."""

    lora_path: Path
    output_dir: Path
    final_step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    cache: CacheReport | None = None
    is_main_process: bool = True


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return tuple(torch.randperm(n, generator=gen).tolist())


def sample_order(n: int, seed: int, index: int) -> tuple[int, int]:
    """(sample, epoch) of the ``index``-th sample drawn: a fresh shuffle of all ``n`` each epoch."""
    epoch, pos = divmod(index, n)
    return _epoch_permutation(n, seed, epoch)[pos], epoch


def flow_loss(
    adapter: TrainableVideoModel,
    model: torch.nn.Module,
    x0: torch.Tensor,
    text: dict[str, torch.Tensor],
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The training MSE of ``model`` on clean latents ``x0`` [B, C, f, h, w] at noise levels ``sigma`` [B].

    ``text`` is the batch's conditioning: the caption's tensors and, for image-to-video, the
    clip's own (``TrainableVideoModel.encode_clip``); ``adapter.loss`` picks the latents it covers.

    The adapter's objective (``TrainableVideoModel.training_inputs``) decides the noisy input, the
    target and the timestep: flow matching (``x_s = (1 - s) x0 + s noise``, target ``noise - x0``,
    timestep ``1000 s``) for every family but CogVideoX, whose ``sigma`` are integer DDPM
    timesteps and whose target is the v-prediction ``sqrt(a) noise - sqrt(1 - a) x0``.
    """
    device = torch.device(device) if device is not None else x0.device
    noisy, target, timesteps = adapter.training_inputs(x0, noise, sigma, text)
    timesteps = timesteps.to(device)
    pred = adapter.predict(model, noisy.to(device, dtype), timesteps, text)
    return adapter.loss(pred.float(), target.to(device).float(), text)


def _resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def collate_text(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack one batch's cached text tensors (each key: same shape in every clip, else a
    ValueError saying how to fix it)."""
    keys = items[0].keys()
    out = {}
    for k in keys:
        shapes = {tuple(it[k].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(
                f"Cached text tensors {k!r} have different shapes {sorted(shapes)} in one batch; "
                "use --batch-size 1 or re-cache with a fixed max sequence length."
            )
        out[k] = torch.stack([it[k] for it in items])
    return out


def _read_metrics(path: Path, keep_until: int) -> list[str]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_until:
                rows.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
    return rows


def _check_resume(state: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    saved = state.get("config", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in cfg.resume_view().items()
        if k in RESUME_KEYS and json.dumps(saved.get(k), default=str) != json.dumps(v, default=str)
    ]
    if diffs:
        raise ValueError(
            f"Cannot resume from {str(path)!r}: these settings differ from the run that wrote it: "
            + "; ".join(diffs)
            + ". Use the same settings, or start a new run in another --output-dir."
        )
    step = int(state.get("step", 0))
    if cfg.max_train_steps < step:
        raise ValueError(
            f"--max-train-steps {cfg.max_train_steps} is below the step of {str(path)!r} ({step}): resuming would "
            f"train nothing and export the step-{step} LoRA under a config that says {cfg.max_train_steps}. Pass "
            f"--max-train-steps above {step} to train on, or --resume with an earlier checkpoint folder."
        )
    if state.get("max_train_steps") != cfg.max_train_steps and cfg.lr_scheduler != "constant":
        logger.warning(
            "vidsparse: max_train_steps changed (%s -> %s); the %s LR schedule continues on the new length.",
            state.get("max_train_steps"),
            cfg.max_train_steps,
            cfg.lr_scheduler,
        )


def lora_config(cfg: TrainConfig, adapter: TrainableVideoModel) -> LoraConfig:
    """peft's ``LoraConfig`` of a run: the rank, alpha and dropout of ``cfg`` on its target
    modules (default: the adapter's self-attention projections), each checked to exist."""
    from peft import LoraConfig

    targets = list(cfg.target_modules or adapter.default_target_modules)
    names = [n for n, _ in adapter.transformer.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.split(".", 2)[-1] for n in names if n.count(".") >= 2 and "attn" in n})[:12]
        raise ValueError(
            f"LoRA target modules {missing} match no module of the {adapter.family} transformer; "
            f"module names look like {examples}. Pass --target-modules with such names."
        )
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, init_lora_weights=True, target_modules=targets
    )


def prepare_cache(
    cfg: TrainConfig,
    adapter: TrainableVideoModel,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
) -> CacheReport:
    """Scan the dataset and bring the latent/text cache up to date (encoders on ``device``)."""
    spec = ClipSpec(cfg.num_frames, cfg.height, cfg.width, cfg.frame_stride)
    adapter.validate_clip(spec)
    cache_dir = (
        Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(cfg.data_dir).expanduser() / DEFAULT_CACHE_DIRNAME
    )
    scan = scan_dataset(cfg.data_dir, cfg.caption_column, exclude=[cache_dir, Path(cfg.output_dir)])
    adapter.encoders_to(device)
    try:
        report = LatentCache(cache_dir).prepare(
            scan.samples,
            spec,
            adapter,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            progress=cfg.progress and rank == 0,
        )
    finally:
        adapter.encoders_to("cpu")
    report.skipped = list(scan.skipped) + report.skipped
    if rank == 0 and report.samples:  # with none left, the error below names them
        for rel, reason in report.skipped:
            logger.warning("vidsparse: skipped %s: %s", rel, reason)
    if not report.samples:
        details = "; ".join(f"{r}: {why}" for r, why in report.skipped[:10]) or "no video files found"
        raise ValueError(
            f"No usable training videos in {cfg.data_dir!r} ({details}). Expected video files "
            f"({VIDEO_FORMATS}) with captions (same-name .txt or metadata.jsonl) and at least "
            f"{spec.source_frames} frames each."
        )
    return report


@dataclass
class _Run:
    """The process's place in the run: accelerator, rank, device and output folder."""

    cfg: TrainConfig
    out: Path
    precision: str
    accelerator: Any
    rank: int
    world: int
    device: torch.device
    main: bool

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass
class _Optimization:
    """What the optimizer steps: the prepared model, its LoRA parameters (and their names)."""

    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    names: list[str]
    generator: torch.Generator


def _start_run(cfg: TrainConfig) -> _Run:
    from accelerate import Accelerator

    out = Path(cfg.output_dir).expanduser()
    precision = _resolve_precision(cfg.mixed_precision)
    # cpu=True on CPU-only hosts, so torchrun / accelerate launch there gives gloo data parallelism
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    run = _Run(cfg, out, precision, accelerator, accelerator.process_index, accelerator.num_processes,
               accelerator.device, accelerator.is_main_process)  # fmt: skip
    if precision == "bf16" and run.device.type == "cpu":
        logger.warning("vidsparse: bf16 mixed precision on CPU is slow; use --mixed-precision no for CPU runs.")
    return run


def _resume_path(run: _Run) -> Path | None:
    """The checkpoint to resume from (checked against the settings before any encoding), or None."""
    cfg, out = run.cfg, run.out
    resume_path = resolve_resume(cfg.resume, out) if cfg.resume else None
    if resume_path is None and (found := list_checkpoints(out)):
        # Starting over beside them would mix two runs: pruning would drop the new run's checkpoints,
        # and a later --resume would pick the old run's latest one.
        raise ValueError(
            f"--output-dir {str(out)!r} already holds checkpoints of an earlier run (latest: {found[-1][1].name}). "
            "Pass --resume to continue that run, or another --output-dir to start a new one (or delete its "
            "checkpoint-* folders to start over there); nothing was written."
        )
    if cfg.resume == "latest" and resume_path is None and run.main:
        logger.info("vidsparse: no checkpoint in %s yet; starting from step 0.", out)
    if resume_path is not None:  # refuse a mismatched resume before any (possibly long) encoding
        _check_resume(read_state(resume_path), cfg, resume_path)
    return resume_path


def _prepare_transformer(cfg: TrainConfig, adapter: TrainableVideoModel) -> torch.nn.Module:
    """Frozen base, LoRA adapters in fp32, sparse attention, optional gradient checkpointing.

    Set up (and validated: targets, pattern) before the cache, so a bad flag fails in seconds;
    the transformer moves to the device only after the encoders have left it.
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    transformer = adapter.transformer  # one transformer, or a module holding the experts (Wan 2.2 A14B)
    transformer.requires_grad_(False)
    peft_config = lora_config(cfg, adapter)
    experts = _experts(transformer)
    for expert in experts:  # one LoRA per expert, same settings
        expert.add_adapter(copy.deepcopy(peft_config))
    for p in transformer.parameters():
        if p.requires_grad:  # LoRA weights train in fp32 under bf16 autocast
            p.data = p.data.float()
    # two experts: patched through their pipeline, exactly as vidsparse.apply(pipe) at inference (two_stage)
    enable_sparse(adapter.pipe if len(experts) > 1 else transformer, cfg)
    if cfg.gradient_checkpointing:
        for expert in experts:
            enable_gradient_checkpointing(expert)
    return transformer


def _experts(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers transformers inside the trained module (itself, or each expert's)."""
    experts = getattr(module, "experts", None)
    return list(experts().values()) if callable(experts) else [module]


def _cache_samples(run: _Run, adapter: TrainableVideoModel) -> tuple[CacheReport, list[CachedSample], str]:
    """The up-to-date cache (totals over all processes), its samples and the dataset's identity."""
    accelerator = run.accelerator
    report = prepare_cache(run.cfg, adapter, device=run.device, rank=run.rank, world_size=run.world,
                           barrier=accelerator.wait_for_everyone)  # fmt: skip
    if run.world > 1:  # each process handled its share: report the totals
        counts = [report.latents_computed, report.latents_reused, report.text_computed, report.text_reused]
        counts = accelerator.reduce(torch.tensor(counts, device=run.device), "sum").tolist()
        report.latents_computed, report.latents_reused, report.text_computed, report.text_reused = map(int, counts)
    samples: list[CachedSample] = report.samples
    data_id = json.dumps(sorted(s.latent_file.name + s.text_file.name for s in samples))
    if run.main:
        logger.info("vidsparse: %s", report.summary())
    return report, samples, data_id


def _optimization(run: _Run, transformer: torch.nn.Module) -> _Optimization:
    from diffusers.optimization import get_scheduler

    cfg = run.cfg
    transformer.to(run.device)  # already in weight_dtype (load_model), with diffusers' fp32-kept modules
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)  # fmt: skip
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)  # fmt: skip
    if run.world > 1 and len(_experts(transformer)) > 1:
        from accelerate.utils import DistributedDataParallelKwargs

        # a micro-batch whose timesteps all fall on one side of the boundary leaves the other expert unused
        run.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    model, optimizer = run.accelerator.prepare(transformer, optimizer)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + run.rank)
    return _Optimization(model, optimizer, lr_scheduler, params, names, generator)


def _restore(run: _Run, opt: _Optimization, resume_path: Path | None, data_id: str) -> int:
    """Load the checkpoint's LoRA weights, optimizer, schedule and RNG; the step to continue from."""
    if resume_path is None:
        return 0
    state, lora = load_checkpoint(resume_path, optimizer=opt.optimizer, lr_scheduler=opt.lr_scheduler,
                                  generator=opt.generator, rank=run.rank, world_size=run.world)  # fmt: skip
    if state.get("data_id") != data_id and run.main:
        logger.warning("vidsparse: the dataset changed since %s; the sample order differs from the original run.",
                       resume_path)  # fmt: skip
    missing = [n for n in opt.names if n not in lora]
    if missing:
        raise ValueError(
            f"Checkpoint {str(resume_path)!r} lacks LoRA weights {missing[:3]}...; it belongs to another run."
        )
    with torch.no_grad():
        for n, p in zip(opt.names, opt.params):
            p.copy_(lora[n].to(p.device, p.dtype))
    start_step = int(state["step"])
    if run.main:
        logger.info("vidsparse: resumed from %s at step %d.", resume_path, start_step)
    return start_step


def _start_metrics(run: _Run, start_step: int, shift: float, num_samples: int) -> Path:
    """metrics.jsonl cut back to ``start_step`` (a resume) and train_config.json, on the main process."""
    metrics_path = run.out / METRICS_FILE
    if run.main:
        rows = _read_metrics(metrics_path, start_step) if start_step else []
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        write_json(run.out / "train_config.json", {**run.cfg.to_dict(), "resolved_mixed_precision": run.precision,
                                                   "resolved_flow_shift": shift, "num_samples": num_samples,
                                                   "world_size": run.world})  # fmt: skip
    return metrics_path


def _train_step(
    run: _Run,
    opt: _Optimization,
    adapter: TrainableVideoModel,
    samples: list[CachedSample],
    sampler: NoiseSampler,
    shift: float,
    step: int,
) -> tuple[float, float, int, Any]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches: (loss, lr, epoch, grad norm)."""
    cfg, accelerator, world = run.cfg, run.accelerator, run.world
    per_step = cfg.gradient_accumulation_steps * world * cfg.batch_size
    step_loss = torch.zeros((), device=run.device)
    epoch = 0
    for micro in range(cfg.gradient_accumulation_steps):
        base = step * per_step + (micro * world + run.rank) * cfg.batch_size
        picks = [sample_order(len(samples), cfg.seed, base + j) for j in range(cfg.batch_size)]
        epoch = picks[-1][1]
        batch = [samples[i] for i, _ in picks]
        x0 = torch.stack([load_latents(s.latent_file) for s in batch])
        text = collate_text([{**load_text(s.text_file), **load_clip_conditioning(s.latent_file)} for s in batch])
        sigma = adapter.sample_levels(sampler, len(batch), opt.generator, shift)
        noise = torch.randn(x0.shape, generator=opt.generator, dtype=x0.dtype)
        last = micro == cfg.gradient_accumulation_steps - 1
        sync = contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(opt.model)
        with sync, accelerator.autocast():
            loss = flow_loss(adapter, opt.model, x0, text, sigma, noise, dtype=run.weight_dtype, device=run.device)
            accelerator.backward(loss / cfg.gradient_accumulation_steps)
        step_loss += loss.detach() / cfg.gradient_accumulation_steps
    grad_norm = accelerator.clip_grad_norm_(opt.params, cfg.max_grad_norm)
    opt.optimizer.step()
    lr = opt.lr_scheduler.get_last_lr()[0]
    opt.lr_scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"Loss became {mean_loss} at step {step + 1}; lower --learning-rate or use --mixed-precision no."
        )
    return mean_loss, lr, epoch, grad_norm


def _log_step(
    run: _Run, metrics, bar, done: int, mean_loss: float, lr: float, epoch: int, grad_norm, t0: float
) -> None:
    """A metrics.jsonl row, the progress bar, and every ``log_every`` steps a line (main process)."""
    cfg = run.cfg
    row = {"step": done, "loss": mean_loss, "lr": lr, "epoch": epoch,
           "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    if run.device.type == "cuda":
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    bar.update(1)
    if done % cfg.log_every == 0 or done == cfg.max_train_steps:
        bar.write(f"step {done}/{cfg.max_train_steps}  loss {mean_loss:.5f}  lr {lr:.3e}  epoch {epoch}")


def _save_step_checkpoint(run: _Run, opt: _Optimization, done: int, checkpoint_state: dict[str, Any]) -> None:
    lora_state = {n: p.detach().float().cpu() for n, p in zip(opt.names, opt.params)}
    save_checkpoint(run.out, done, lora_state=lora_state, optimizer=opt.optimizer, lr_scheduler=opt.lr_scheduler,
                    generator=opt.generator, state=checkpoint_state, rank=run.rank, world_size=run.world,
                    barrier=run.accelerator.wait_for_everyone, keep=run.cfg.checkpoints_total_limit)  # fmt: skip


def _report_pattern(adapter: TrainableVideoModel, cfg: TrainConfig) -> list[str]:
    """Log what the first step trained under (per expert), warn where it is dense in effect."""
    experts = _experts(adapter.transformer)
    ran = []
    for i, expert in enumerate(experts):
        lines, warnings = pattern_report(expert, cfg.attention_backend)
        prefix = f"expert {i}: " if len(experts) > 1 else ""
        ran.extend(prefix + line for line in lines)
        for j, line in enumerate(lines):  # lines[0]: the grid; then one per layer group
            logger.info("vidsparse: %s%s", prefix, f"the pattern as it trains ({line}):" if j == 0 else f"  {line}")
        for line in warnings:
            logger.warning("vidsparse: %s%s", prefix, line)
    return ran


def _export(
    run: _Run, adapter: TrainableVideoModel, opt: _Optimization, final_step: int, bar, ran: list[str] = ()
) -> Path:
    """The LoRA file (diffusers format) and its vidsparse_lora.json, written by the main process."""
    cfg = run.cfg
    lora_path = run.out / "pytorch_lora_weights.safetensors"
    if run.main:
        info = {
            "format": "vidsparse-lora/1",
            "model": cfg.model,
            "family": adapter.family,
            "pattern": cfg.resume_view()["pattern"],
            "num_frames": cfg.num_frames,
            "height": cfg.height,
            "width": cfg.width,
            "rank": cfg.rank,
            "alpha": cfg.lora_alpha,
            "target_modules": list(cfg.target_modules or adapter.default_target_modules),
            "steps": final_step,
        }
        if ran:  # the pattern as it ran on the training grid (family defaults fitted to it)
            info["pattern_ran"] = list(ran)
        model = unwrap(opt.model)
        files = adapter.lora_files
        if len(files) > 1:
            info["lora_files"] = dict(files)
        for component, weight_name in files.items():  # one file per trained expert
            module = getattr(model, component) if len(files) > 1 else model
            path = save_lora(run.out, type(adapter.pipe), module, info=info, dtype=cfg.save_dtype,
                             weight_name=weight_name)  # fmt: skip
            lora_path = path if component == "transformer" else lora_path
            bar.write(f"vidsparse: LoRA of {component} saved to {path} ({INFO_NAME} beside it).")
    return lora_path


def _check_inputs(cfg: TrainConfig) -> None:
    """Before anything is created (the output folder included): the data folder holds captioned
    videos and the output and cache folders can be written. Decoding problems surface later, per video."""
    from vidsparse.video_io import check_writable_dir

    cache_dir = (
        Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(cfg.data_dir).expanduser() / DEFAULT_CACHE_DIRNAME
    )
    scan = scan_dataset(cfg.data_dir, cfg.caption_column, exclude=[cache_dir, Path(cfg.output_dir)])
    if not scan.samples:
        details = "; ".join(f"{r}: {why}" for r, why in list(scan.skipped)[:10]) or "no video files found"
        raise ValueError(
            f"No usable training videos in {cfg.data_dir!r} ({details}). Expected video files "
            f"({VIDEO_FORMATS}) with captions (same-name .txt or metadata.jsonl); nothing was written."
        )
    check_writable_dir(Path(cfg.output_dir).expanduser(), f"--output-dir {cfg.output_dir!r}")
    # the cache is first written after the model loads and the output folder exists: checked now
    what = (
        f"--cache-dir {cfg.cache_dir!r}"
        if cfg.cache_dir
        else f"the latent cache {str(cache_dir)!r} (by default inside --data-dir; --cache-dir puts it elsewhere)"
    )
    check_writable_dir(cache_dir, what)


def _check_backend(cfg: TrainConfig) -> None:
    """The attention backend runs where _start_run's Accelerator will put the model (a GPU when there
    is one) at the precision attention sees under autocast; checked before the Accelerator exists."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = _resolve_precision(cfg.mixed_precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    check_runs_on(cfg.attention_backend, device, dtype, "--attention-backend", backward=True)


def train_lora(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a LoRA training run; see ``TrainConfig`` for the settings."""
    from tqdm.auto import tqdm

    sampler = NoiseSampler(cfg.timestep_sampling, cfg.flow_shift, cfg.logit_mean, cfg.logit_std)  # checks its values
    check_trainable(cfg.model)  # a refused pipeline class: said before the data scan, the output folder or weights
    check_condition_frames(cfg.model, cfg.condition_frames)
    check_clip_size(cfg.model, cfg.num_frames, cfg.height, cfg.width)
    _check_inputs(cfg)
    _check_backend(cfg)
    run = _start_run(cfg)
    resume_path = _resume_path(run)
    adapter = load_model(cfg.model, dtype=run.weight_dtype)
    adapter.set_condition_frames(cfg.condition_frames)  # its 8k + 1 rule needs the VAE; before any encoding
    adapter.check_sampling(sampler)  # before any encoding: e.g. CogVideoX refuses a flow shift
    transformer = _prepare_transformer(cfg, adapter)
    created = run.main and not run.out.exists()
    if run.main:  # only now: a flag the model refuses (--condition-frames, a flow shift, ...) leaves no folder
        run.out.mkdir(parents=True, exist_ok=True)
    try:
        report, samples, data_id = _cache_samples(run, adapter)
    except BaseException:
        if created and not any(run.out.iterdir()):  # no usable video (too short, undecodable): leave nothing
            run.out.rmdir()
        raise
    opt = _optimization(run, transformer)
    start_step = _restore(run, opt, resume_path, data_id)
    shift = sampler.resolved_shift(adapter.default_flow_shift())

    metrics_path = _start_metrics(run, start_step, shift, len(samples))
    checkpoint_state = {"config": cfg.resume_view(), "data_id": data_id, "max_train_steps": cfg.max_train_steps}
    losses: list[float] = []
    ran: list[str] = []  # the pattern as it ran, per expert and layer group (vidsparse_lora.json)
    bar = tqdm(total=cfg.max_train_steps, initial=start_step, desc="train-lora", unit="step",
               disable=not (cfg.progress and run.main))  # fmt: skip
    t0 = time.perf_counter()
    with bar, open(metrics_path, "a", encoding="utf-8") if run.main else contextlib.nullcontext() as metrics:
        for step in range(start_step, cfg.max_train_steps):
            mean_loss, lr, epoch, grad_norm = _train_step(run, opt, adapter, samples, sampler, shift, step)
            losses.append(mean_loss)
            done = step + 1
            if run.main and step == start_step:  # what the first forward ran: the pattern the LoRA learns
                ran = _report_pattern(adapter, cfg)
            if run.main:
                _log_step(run, metrics, bar, done, mean_loss, lr, epoch, grad_norm, t0)
            if done % cfg.checkpointing_steps == 0 or done == cfg.max_train_steps:
                _save_step_checkpoint(run, opt, done, checkpoint_state)

    run.accelerator.wait_for_everyone()
    final_step = max(start_step, cfg.max_train_steps)
    lora_path = _export(run, adapter, opt, final_step, bar, ran)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainResult(
        lora_path=lora_path,
        output_dir=run.out,
        final_step=final_step,
        start_step=start_step,
        losses=losses,
        cache=report,
        is_main_process=run.main,
    )


__all__ = [
    "METRICS_FILE",
    "TrainResult",
    "collate_text",
    "flow_loss",
    "lora_config",
    "prepare_cache",
    "sample_order",
    "train_lora",
]
