"""Fine-tune a LoRA for longer videos with the sparse attention pattern active.

Radial Attention's recipe: a LoRA (rank 128 on the self-attention q/k/v/o projections) trained
with the sparse mask on lets a model generate 2-4x longer videos at a fraction of full
fine-tuning's cost. The data is a folder of videos (mp4, webm, gif, mov, mkv, avi, m4v) with captions (same-name
.txt or metadata.jsonl / metadata.csv); VAE latents and text embeddings are cached once beside
a manifest (default: <data-dir>/.vidsparse-cache) and reused across runs.

Writes to --output-dir: pytorch_lora_weights.safetensors (diffusers format; load with
pipe.load_lora_weights(dir) or vidsparse generate --lora dir), vidsparse_lora.json,
metrics.jsonl (loss, lr per step), train_config.json and checkpoint-<step>/ folders
(--resume continues exactly). Multi-GPU: accelerate launch -m vidsparse train-lora ...

Example (Wan2.1-1.3B at 2x length, radial):
  vidsparse train-lora --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --data-dir data/ \\
      --output-dir runs/wan-2x --num-frames 161 --height 480 --width 832 --pattern radial
"""

from __future__ import annotations

import argparse
import logging

from vidsparse.kernels.backends import backend_choices
from vidsparse.lora.config import LR_SCHEDULERS, MIXED_PRECISIONS, SAVE_DTYPES, TrainConfig
from vidsparse.lora.flow import TIMESTEP_SAMPLINGS

_D = TrainConfig.__dataclass_fields__


def _default(name: str):
    return _D[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-lora`` flags (one per ``TrainConfig`` field) plus the pattern flags."""
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", required=True, help="folder of videos with captions (.txt or metadata.jsonl/.csv)")
    data.add_argument("--output-dir", required=True, help="where the LoRA, checkpoints and metrics go")
    data.add_argument(
        "--model",
        required=True,
        help="'tiny' (the built-in small model of a synthetic world, docs/tiny_model.md), "
        "'tiny-random' / 'tiny-<name>' (built-in random-init test models, e.g. tiny-wan-i2v), a "
        "hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or a local diffusers pipeline folder: "
        "text-to-video Wan 2.1 / 2.2, SkyReels-V2, HunyuanVideo, HunyuanVideo 1.5, Kandinsky 5, "
        "Wan VACE, LTX-Video, Mochi, CogVideoX; image-to-video Wan, SkyReels-V2, CogVideoX, "
        "LTX-Video, HunyuanVideo, HunyuanVideo 1.5, Kandinsky 5; LTXConditionPipeline; "
        "Cosmos-Predict2 video2world and Cosmos-Predict2.5 (e.g. tiny-cosmos, "
        "tiny-cosmos2-video2world) (docs/lora.md lists what is refused and why)",
    )
    data.add_argument("--cache-dir", default=None, help="latent/text cache (default <data-dir>/.vidsparse-cache)")
    data.add_argument(
        "--caption-column",
        default=None,
        help="caption column of metadata.jsonl/.csv (default: text, caption or prompt)",
    )
    data.add_argument(
        "--num-frames",
        type=int,
        default=_default("num_frames"),
        help="frames per training clip (default %(default)s: Wan2.1 at 2x its native 81)",
    )
    data.add_argument("--height", type=int, default=_default("height"), help="clip height (default %(default)s)")
    data.add_argument("--width", type=int, default=_default("width"), help="clip width (default %(default)s)")
    data.add_argument(
        "--frame-stride",
        type=int,
        default=_default("frame_stride"),
        help="take every n-th source frame (default %(default)s)",
    )
    data.add_argument(
        "--condition-frames",
        type=int,
        default=None,
        metavar="N",
        help="LTXConditionPipeline: condition each clip on its first N frames, 1 (an image, the "
        "default) or 8k + 1 (a video prefix, to extend videos); Cosmos-Predict2 video2world: 1 "
        "(default) or 4k + 1; Cosmos-Predict2.5: 1 or 5 (default: text2world); refused for "
        "other pipelines",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=_default("rank"), help="LoRA rank (default %(default)s)")
    lora.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, i.e. scale 1)")
    lora.add_argument(
        "--lora-dropout", type=float, default=_default("dropout"), help="LoRA dropout (default %(default)s)"
    )
    # TrainConfig fields whose flag is spelled otherwise, so its errors name the flag (cli.in_flag_terms)
    parser.set_defaults(_config_flags={"dropout": "--lora-dropout"})
    lora.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names (default: self-attention q/k/v/o, for Wan "
        "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0)",
    )

    opt = parser.add_argument_group("optimization")
    opt.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=_default("learning_rate"),
        help="AdamW learning rate (default %(default)s)",
    )
    opt.add_argument(
        "--weight-decay", type=float, default=_default("weight_decay"), help="AdamW weight decay (default %(default)s)"
    )
    opt.add_argument(
        "--adam-beta1",
        type=float,
        default=_default("adam_beta1"),
        help="AdamW first-moment decay (default %(default)s)",
    )
    opt.add_argument(
        "--adam-beta2",
        type=float,
        default=_default("adam_beta2"),
        help="AdamW second-moment decay (default %(default)s)",
    )
    opt.add_argument(
        "--adam-epsilon", type=float, default=_default("adam_epsilon"), help="AdamW epsilon (default %(default)s)"
    )
    opt.add_argument(
        "--max-grad-norm", type=float, default=_default("max_grad_norm"), help="gradient clipping (default %(default)s)"
    )
    opt.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        default=_default("lr_scheduler"),
        help=f"learning-rate schedule after warm-up, one of {', '.join(LR_SCHEDULERS)} (default %(default)s)",
    )
    opt.add_argument(
        "--lr-warmup-steps",
        type=int,
        default=_default("lr_warmup_steps"),
        help="steps of linear learning-rate warm-up from 0 (default %(default)s)",
    )
    opt.add_argument(
        "--max-train-steps", type=int, default=_default("max_train_steps"), help="optimizer steps (default %(default)s)"
    )
    opt.add_argument(
        "--batch-size",
        type=int,
        default=_default("batch_size"),
        help="clips per process per micro-step (default %(default)s)",
    )
    opt.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=_default("gradient_accumulation_steps"),
        help="micro-steps whose gradients make one optimizer step (default %(default)s)",
    )
    opt.add_argument(
        "--timestep-sampling",
        choices=TIMESTEP_SAMPLINGS,
        default=_default("timestep_sampling"),
        help="noise-level distribution: uniform, logit_normal (SD3) or shifted (uniform + the "
        "scheduler's time shift, as Wan) (default %(default)s)",
    )
    opt.add_argument(
        "--flow-shift",
        type=float,
        default=None,
        help="time shift s' = k s / (1 + (k - 1) s) (default: the pipeline scheduler's for 'shifted', 1 otherwise)",
    )
    opt.add_argument(
        "--logit-mean",
        type=float,
        default=_default("logit_mean"),
        help="mean of the normal behind --timestep-sampling logit_normal (default %(default)s)",
    )
    opt.add_argument(
        "--logit-std",
        type=float,
        default=_default("logit_std"),
        help="standard deviation of that normal (default %(default)s)",
    )
    opt.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=_default("gradient_checkpointing"),
        help="recompute activations in backward (default on)",
    )
    opt.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISIONS,
        default=_default("mixed_precision"),
        help="auto: bf16 on a CUDA GPU, no (fp32) on CPU (default %(default)s)",
    )
    opt.add_argument(
        "--seed",
        type=int,
        default=_default("seed"),
        help="seed of the LoRA init, noise and data order (default %(default)s)",
    )

    run = parser.add_argument_group("checkpoints and logging")
    run.add_argument(
        "--checkpointing-steps",
        type=int,
        default=_default("checkpointing_steps"),
        help="save a resumable checkpoint every N steps (default %(default)s)",
    )
    run.add_argument(
        "--checkpoints-total-limit",
        type=int,
        default=_default("checkpoints_total_limit"),
        help="keep the newest N checkpoints, 0 keeps all (default %(default)s)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="latest|PATH",
        help="continue from the newest checkpoint in --output-dir (or the given one)",
    )
    run.add_argument(
        "--save-dtype",
        choices=SAVE_DTYPES,
        default=_default("save_dtype"),
        help="dtype of the exported LoRA weights (default %(default)s)",
    )
    run.add_argument(
        "--log-every",
        type=int,
        default=_default("log_every"),
        help="print a loss line every N steps (the metrics file gets every step; default %(default)s)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    sparse = parser.add_argument_group("sparse attention during training")
    sparse.add_argument(
        "--attention-backend",
        choices=backend_choices(),
        default=_default("attention_backend"),
        help=f"sparse attention kernel, one of {', '.join(backend_choices())}; auto: Triton "
        "kernel on GPU, exact torch reference on CPU (default %(default)s)",
    )
    sparse.add_argument(
        "--dense-layers",
        default=None,
        metavar="LAYERS",
        help="blocks that stay dense, as for vidsparse generate: 0,1,2 or 0-3 (negative counts "
        "from the end), 'none' for no dense block (default: the family's; Radial on Wan keeps "
        "block 0 dense). Use the same value at inference.",
    )
    from vidsparse.pattern_flags import add_pattern_arguments

    add_pattern_arguments(parser, default="radial", family_defaults=True)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,1"``, ``"0-3"``, ``"-1"`` or ``"none"`` -> block indices (the ``vidsparse generate`` syntax).

    Raises ValueError (the CLI prints it as a usage error) for anything else.
    """
    from vidsparse.pattern_flags import parse_dense_layers

    return parse_dense_layers(text, error=ValueError, noun="block")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from vidsparse.pattern_flags import pattern_options_from_args

    pattern, options = pattern_options_from_args(args)  # a name: family defaults, as vidsparse.apply
    targets = None
    if args.target_modules:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    limit = args.checkpoints_total_limit
    if limit < 0:  # 0 is the flag's "keep all" (None in TrainConfig), so its range is the flag's to say
        raise ValueError(f"--checkpoints-total-limit must be >= 0 (0 keeps every checkpoint), got {limit}.")
    return TrainConfig(
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        model=args.model,
        cache_dir=args.cache_dir,
        caption_column=args.caption_column,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        frame_stride=args.frame_stride,
        condition_frames=args.condition_frames,
        pattern=pattern,
        pattern_options=tuple(options.items()),
        attention_backend=args.attention_backend,
        dense_layers=None if args.dense_layers is None else parse_layers(args.dense_layers),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.lora_dropout,
        target_modules=targets,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        max_train_steps=args.max_train_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        timestep_sampling=args.timestep_sampling,
        flow_shift=args.flow_shift,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=None if limit == 0 else limit,
        resume=args.resume,
        seed=args.seed,
        save_dtype=args.save_dtype,
        log_every=args.log_every,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from vidsparse.lora.train import train_lora

    cfg = config_from_args(args)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vidsparse").setLevel(logging.INFO)
    result = train_lora(cfg)
    if result.is_main_process:
        print(f"LoRA: {result.lora_path}  (steps {result.start_step} -> {result.final_step})")
    return 0
