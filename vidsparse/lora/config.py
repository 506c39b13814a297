"""``TrainConfig``: every setting of a LoRA training run, validated up front.

Defaults follow Radial Attention's length-extension recipe (LoRA rank 128 on the
self-attention q/k/v/o projections, trained with the sparse mask active) at Wan2.1-1.3B's 2x
length (161 frames at 480x832).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vidsparse.lora.flow import TIMESTEP_SAMPLINGS

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("auto", "no", "bf16")
SAVE_DTYPES = ("fp32", "bf16", "fp16")

# Settings a resumed run must share with the run that wrote the checkpoint: changing any of
# them would make the continuation a different run (``max_train_steps`` may grow; see train.py).
RESUME_KEYS = (
    "model",
    "num_frames",
    "height",
    "width",
    "frame_stride",
    "pattern",
    "attention_backend",
    "dense_layers",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler",
    "lr_warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "timestep_sampling",
    "flow_shift",
    "logit_mean",
    "logit_std",
    "seed",
    "condition_frames",
)


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run (the ``vidsparse train-lora`` flags, one field each).

    ``pattern`` is a vidsparse pattern object or a registry name (``"radial"``, ``"dense"``, ...);
    a name takes the model family's defaults (as ``vidsparse.apply`` at inference), overridden by
    ``pattern_options`` as (name, value) pairs. ``dense_layers=None`` keeps the family's dense
    layers (Radial on Wan: block 0), a tuple lists the blocks that stay dense.
    ``condition_frames`` (LTXConditionPipeline, Cosmos-Predict2 / 2.5): the clip's first frames that
    condition it, 1 (an image) or a video prefix (LTX ``8k + 1``, Predict2 ``4k + 1``, Predict2.5 5);
    None is the adapter's default (1; Predict2.5: none, text2world). ``alpha=None`` means alpha = rank (scale 1).
    ``target_modules=None`` takes the model family's self-attention q/k/v/o projections.
    """

    data_dir: str
    output_dir: str
    model: str = "tiny-random"  # the fast random-init pipeline (the CLI requires --model)
    cache_dir: str | None = None
    caption_column: str | None = None
    num_frames: int = 161
    height: int = 480
    width: int = 832
    frame_stride: int = 1
    condition_frames: int | None = None  # LTXConditionPipeline, Cosmos: the clip's first N frames condition it
    pattern: Any = "radial"
    pattern_options: tuple[tuple[str, Any], ...] = ()
    attention_backend: str = "auto"
    dense_layers: tuple[int, ...] | None = None
    rank: int = 128
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 2000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    timestep_sampling: str = "shifted"
    flow_shift: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    checkpointing_steps: int = 250
    checkpoints_total_limit: int | None = 3
    resume: str | None = None
    seed: int = 0
    save_dtype: str = "fp32"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            lo = 0 if allow_zero else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")

        for name in (
            "num_frames",
            "height",
            "width",
            "frame_stride",
            "rank",
            "max_train_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "log_every",
        ):
            positive_int(name)
        for name in ("lr_warmup_steps", "seed"):
            positive_int(name, allow_zero=True)
        if self.condition_frames is not None:
            positive_int("condition_frames")
        if self.dense_layers is not None:
            layers = self.dense_layers
            if isinstance(layers, (list, range)):
                layers = tuple(layers)
            if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(
                    f"dense_layers must be a tuple of block indices such as (0, 1) (negative counts from the end), "
                    f"or None for the family default, got {self.dense_layers!r}."
                )
            object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        if self.checkpoints_total_limit is not None:
            positive_int("checkpoints_total_limit")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}.")
        for name, value, choices in (
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISIONS),
            ("save_dtype", self.save_dtype, SAVE_DTYPES),
            ("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(
                f"target_modules must be a non-empty tuple of module names such as ('attn1.to_q', 'attn1.to_k'), "
                f"got {self.target_modules!r}."
            )
        if not isinstance(self.pattern_options, tuple):
            object.__setattr__(self, "pattern_options", tuple(dict(self.pattern_options).items()))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def resume_view(self) -> dict[str, Any]:
        """The settings a resume must match, as JSON-friendly values."""
        view = {k: getattr(self, k) for k in RESUME_KEYS}
        view["pattern"] = (
            repr(self.pattern) if not isinstance(self.pattern, str) else (f"{self.pattern}{dict(self.pattern_options)}")
        )
        view["alpha"] = self.lora_alpha
        view["target_modules"] = list(self.target_modules) if self.target_modules else None
        return view

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = self.resume_view()["pattern"]
        return d


def pattern_label(record: Any) -> str:
    """A recorded pattern (``resume_view``'s ``"radial{}"``, ``"tile{'window': (3, 3, 3)}"``) as a person
    reads it: the bare name when it has no options. The record itself keeps its form, which resumes compare."""
    text = str(record)
    return text.removesuffix("{}") if text.endswith("{}") else text


__all__ = ["LR_SCHEDULERS", "MIXED_PRECISIONS", "RESUME_KEYS", "SAVE_DTYPES", "TrainConfig", "pattern_label"]
