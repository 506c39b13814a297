"""The record of one model family: everything vidsparse knows about a diffusers video transformer.

A family module (``vidsparse/families/<name>.py``) builds one ``Family`` and names it
``FAMILY``; the registry (``vidsparse.families``) collects them. ``inspect``, ``generate``,
``vidsparse.apply``, LoRA training and ``vidsparse.parallel`` all read this record, so a new
model is one new module (see docs/architecture.md, "How to add a model family").

This module imports only torch and ``vidsparse.layout``: family modules can be imported by
every layer (pipelines, LoRA, parallel, CLI) without import cycles. Things that need heavier
code (the LoRA adapter class, tiny pipelines) are *loader functions* that import on call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from vidsparse.layout import VideoLayout

if TYPE_CHECKING:
    from vidsparse.families.decode import ClipDecode
    from vidsparse.families.processor import SparseProcessor

Grid = tuple[int, int, int]
#: (module path, attention module, layer index) of every self-attention the family patches.
AttentionPaths = Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module, int]]]
#: Options of one pattern for this family: a dict, or a function of (layout, two_stage) -> dict.
PatternDefaults = Mapping[str, Any] | Callable[[VideoLayout, bool], dict[str, Any]]


def normalize_name(name: str) -> str:
    """Registry key of a family / geometry name: lower case, no '-', '_' or spaces."""
    return str(name).strip().lower().replace("_", "").replace("-", "").replace(" ", "")


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


# -- video geometry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoGeometry:
    """How a model family turns a video (frames x height x width) into self-attention tokens.

    ``temporal``/``spatial`` are the VAE's compression factors (causal video VAEs keep the
    first frame: latent frames = (frames - 1) // temporal + 1), ``patch`` the transformer's
    (t, h, w) patchify. ``text_len``/``text_position`` is the text span joint-attention models
    put in the same sequence (0 / "none" when text goes through cross-attention).
    ``default_video`` (frames, height, width) and ``fps`` are the reference pipeline's.
    """

    name: str
    temporal: int
    spatial: int
    patch: tuple[int, int, int]
    default_video: tuple[int, int, int]
    text_len: int = 0
    text_position: str = "none"
    fps: int = 16
    aliases: tuple[str, ...] = ()
    # Fewest latent pixels a side the VAE decodes (LTX-2's padded decoder convs need 2).
    min_latent_side: int = 1

    def check_video(self, frames: int, height: int, width: int) -> None:
        """ValueError naming the nearest valid sizes if the VAE and patchify cannot take this video."""
        problems = []
        t = self.temporal
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
            lo = max(1, (max(frames, 1) - 1) // t * t + 1)
            hi = lo + t if lo < frames else lo
            near = f"{lo} or {hi}" if lo != hi else f"{lo}"
            problems.append(
                f"frames={frames}: the {self.name} VAE compresses time {t}x and keeps the first frame, so frames "
                f"must be 1 + a multiple of {t}; nearest valid: {near}"
            )
        for label, value, p in (("height", height, self.patch[1]), ("width", width, self.patch[2])):
            m = self.spatial * p
            if not isinstance(value, int) or value < m or value % m:
                lo = max(value, 0) // m * m
                hi = lo + m
                near = f"{lo} or {hi}" if lo >= m else f"{hi}"
                problems.append(
                    f"{label}={value}: must be a multiple of {m} ({self.spatial}x VAE x {p} patch); nearest valid: {near}"
                )
            elif value // self.spatial < self.min_latent_side:
                least = -(-self.min_latent_side * self.spatial // m) * m
                problems.append(
                    f"{label}={value}: the {self.name} VAE decodes at least {self.min_latent_side} latent pixels a "
                    f"side ({self.min_latent_side * self.spatial} px); smallest valid: {least}"
                )
        if problems:
            raise ValueError(
                f"Video size {frames}x{height}x{width} does not fit {self.name}: " + "; ".join(problems) + "."
            )

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video (the causal VAE keeps the first frame)."""
        return (frames - 1) // self.temporal + 1

    def latent_grid(self, frames: int, height: int, width: int) -> Grid:
        """Token grid (F, H, W) after the VAE and patchify, as diffusers' pipelines compute it."""
        self.check_video(frames, height, width)
        latent_frames = self.latent_frames(frames)
        pt, ph, pw = self.patch
        # diffusers pads latent frames up to a multiple of patch_t (CogVideoX 1.5).
        return (-(-latent_frames // pt), height // (self.spatial * ph), width // (self.spatial * pw))

    def with_patch_from(self, transformer_config: Mapping[str, Any] | None) -> VideoGeometry:
        """This geometry with the patch size a transformer ``config.json`` declares (if any)."""
        cfg = transformer_config or {}
        patch = cfg.get("patch_size")
        if isinstance(patch, (list, tuple)) and len(patch) == 3:
            return replace(self, patch=tuple(int(p) for p in patch))
        if isinstance(patch, int):
            pt = cfg.get("patch_size_t") or 1
            return replace(self, patch=(int(pt), patch, patch))
        return self


# -- parallel shard plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A tensor to cut to the rank's video tokens along ``dim`` (only when it has ``ndim`` dims).

    ``per_frame``: the tensor has one entry per latent frame along ``dim`` (Wan-Animate's motion
    vectors [B, T, N, C]) and is cut to the rank's frames instead of its tokens.
    """

    dim: int
    ndim: int
    per_frame: bool = False


#: (transformer, attend) -> [(attention module, processor to set for the parallel run), ...]
MergedAttention = Callable[[torch.nn.Module, Callable[..., torch.Tensor]], list[tuple[torch.nn.Module, Any]]]


@dataclass(frozen=True)
class ShardPlan:
    """Where a transformer family's token sequence is cut and re-assembled (``vidsparse.parallel``).

    ``inputs``: module path -> {argument name: Shard}, cut before the module runs;
    ``outputs``: module path -> {output index: Shard}, cut after it runs (RoPE tables);
    ``gather``: module path -> Shard, its output all-gathered back to the whole video.
    The path "" is the transformer itself; ``"<path>.*"`` is every child of ``<path>`` (an input each
    block takes whole, such as Cosmos' per-token timestep embedding; merged with entries naming one
    child). A cut argument or output that is a tuple / list of tensors (CogVideoX's
    ``image_rotary_emb``) has each tensor cut.
    ``refuse(transformer) -> reason | None``: a model of the family the plan cannot split (e.g.
    HunyuanVideo I2V, whose blocks treat the first tokens of the sequence as the first frame).
    ``refuse_call(transformer, forward_kwargs) -> reason | None``: a forward the plan cannot split,
    known only from the call (SkyReels-V2 diffusion forcing); checked at every parallel forward
    before anything runs, so every rank raises the same error. Such a forward also keeps caller
    order under ``Family.kernel_order`` (the cut points do not hold it).
    A spec may be a tuple of ``Shard`` alternatives: the one whose ``ndim`` matches the tensor is
    used (LTX-2's RoPE tables are [B, S, D] or [B, H, S, D / 2] by ``rope_type``).
    ``merged_attention(transformer, attend) -> [(module, processor), ...]``: attention modules whose
    queries every rank holds whole while their keys are the rank's video tokens (LTX-2's
    video->audio cross-attention: replicated audio queries, video keys): ``vidsparse.parallel`` sets
    each returned processor for the run and restores the original after. ``attend(q, k, v, scale=None)``
    (q [B, T, H, D] replicated, k / v [B, S_r, H, D] local) returns the exact rows over every rank's
    keys (``partials.merged_rows_attention``: per-rank partials merged by log-sum-exp).
    ``merged_calls(transformer, forward_kwargs) -> [(rows, heads, head_dim), ...]``: the merged
    attention calls one forward makes (what ``estimate.forward_bytes`` counts for them).
    """

    inputs: Mapping[str, Mapping[str, Shard | tuple[Shard, ...]]]
    outputs: Mapping[str, Mapping[int, Shard | tuple[Shard, ...]]]
    gather: Mapping[str, Shard]
    refuse: Callable[[torch.nn.Module], str | None] | None = None
    refuse_call: Callable[[torch.nn.Module, dict[str, Any]], str | None] | None = None
    merged_attention: MergedAttention | None = None
    merged_calls: Callable[[torch.nn.Module, dict[str, Any]], list[tuple[int, int, int]]] | None = None

    def call_refusal(self, transformer: torch.nn.Module, forward_kwargs: dict[str, Any]) -> str | None:
        """Why the plan cannot cut this forward (``refuse_call``), or None."""
        return None if self.refuse_call is None else self.refuse_call(transformer, forward_kwargs)


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root``'s submodule at ``path`` ("" is ``root``), or a ValueError naming both."""
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"vidsparse: {type(root).__name__} has no submodule {path!r}.") from None


def resolve_path(root: torch.nn.Module, path: str) -> str:
    """A shard plan's module ``path`` with negative indices ("blocks.-1": the last block) made concrete."""
    parts, module = [], root
    for part in path.split(".") if path else []:
        if part.startswith("-") and part[1:].isdigit():
            part = str(len(module) + int(part))
        parts.append(part)
        module = submodule(module, part)
    return ".".join(parts)


def expand_paths(root: torch.nn.Module, mapping: Mapping[str, Mapping]) -> dict[str, dict]:
    """A shard plan's path -> specs with ``"<path>.*"`` expanded to every child of ``<path>`` (inputs
    every block takes, e.g. Cosmos' per-token timestep embedding); entries of one module are merged.
    Used where the plan cuts the sequence (``vidsparse.parallel``) and where it permutes it
    (``vidsparse.pipelines.kernel_order``)."""
    out: dict[str, dict] = {}
    for path, specs in mapping.items():
        if path.endswith(".*"):
            parent = path[:-2]
            targets = [f"{parent}.{name}" for name, _ in submodule(root, parent).named_children()]
        else:
            targets = [resolve_path(root, path)]
        for target in targets:
            out.setdefault(target, {}).update(specs)
    return out


# -- tiny random-init models ------------------------------------------------------------------

#: Sizes every tiny model shares, so one hashed prompt embedding fits them all.
TINY_TEXT_DIM = 16
TINY_TEXT_LEN = 8
TINY_LATENT_CHANNELS = 4
TINY_HEADS = 2
TINY_HEAD_DIM = 8


def tiny_dims(**overrides: Any) -> dict[str, Any]:
    """The constructor kwargs most diffusers video transformers share, at tiny sizes (2 heads of 8,
    4 latent channels in and out); ``overrides`` add or replace entries."""
    return {
        "num_attention_heads": TINY_HEADS,
        "attention_head_dim": TINY_HEAD_DIM,
        "in_channels": TINY_LATENT_CHANNELS,
        "out_channels": TINY_LATENT_CHANNELS,
        **overrides,
    }


def finish_tiny_pipeline(pipe: Any, dtype: torch.dtype) -> Any:
    """A just-built tiny pipeline, ready to call: no progress bar (tests and ``generate`` show
    their own) and cast to ``dtype`` (the tiny modules are built in float32)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_masked_prompt_kwargs(pipe, prompt: str, negative_prompt: str, text_dim: int) -> dict[str, Any]:
    """Hashed prompt kwargs for a tiny pipeline whose call takes embeddings with a padding mask.

    ``prompt_embeds`` / ``negative_prompt_embeds`` [1, TINY_TEXT_LEN, text_dim] and bool
    ``prompt_attention_mask`` / ``negative_prompt_attention_mask`` [1, TINY_TEXT_LEN] (one token
    per word + 1, the rest padding), on the pipeline's execution device in the transformer's dtype.
    They are the LoRA trainer's stand-ins for a pipeline without text encoders
    (``vidsparse.lora.adapters.text.tiny_text``), so a LoRA trained on a tiny pipeline meets the
    same prompt embeddings at generation. The LoRA module is imported on call.
    """
    from vidsparse.lora.adapters.text import tiny_text

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    out: dict[str, Any] = {}
    for prefix, text in (("", prompt), ("negative_", negative_prompt)):
        emb, mask = tiny_text(text, TINY_TEXT_LEN, text_dim)
        out[f"{prefix}prompt_embeds"] = emb[None].to(device=device, dtype=dtype)
        out[f"{prefix}prompt_attention_mask"] = mask[None].to(device)
    return out


@dataclass(frozen=True)
class TinyRequest:
    """What a family's tiny-input builder gets (``vidsparse.models.tiny.tiny_inputs``).

    ``randn(*shape)`` draws from the call's seeded generator in the transformer's dtype;
    ``text_mask`` is bool [batch, text_len] (later samples padded when ``pad_text``).
    """

    transformer: torch.nn.Module
    frames: int
    height: int
    width: int
    batch: int
    text_len: int
    text_dim: int
    text_mask: torch.Tensor
    timestep: torch.Tensor
    randn: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TinyVariant:
    """A tiny random-init transformer of the family, for tests, examples and offline runs.

    ``config()`` gives the constructor kwargs of ``transformer_class`` (default: the family's
    first transformer class); ``inputs(request)`` the matching forward kwargs.
    """

    name: str
    config: Callable[[], dict[str, Any]]
    inputs: Callable[[TinyRequest], dict[str, Any]]
    transformer_class: str | None = None


# -- the family record ------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One diffusers video transformer family (see the module docstring).

    Matching: ``transformer_classes`` (diffusers class names, ``isinstance``), ``pipeline_prefixes``
    (pipeline class names served by ``generate``; the longest matching prefix wins).

    Attention: ``processor_names`` are the diffusers processors the family's ``processor``
    mirrors (any other processor is refused); ``processor(original, layer, state)`` builds the
    sparse processor; ``attention_paths`` lists the self-attention modules; ``grid`` and
    ``text_len`` read a forward call's token grid (or ``None``, or a ``str`` saying why there is
    none: that call runs dense with one warning quoting it) and text span; ``text_position`` is where
    joint-attention text sits ("none" | "before" | "after").

    Geometry: ``geometries`` (the first is the default; e.g. CogVideoX 1.0 and 1.5) and
    ``geometry_variant(transformer_config) -> geometry name`` to pick one from a config.

    Defaults: ``pattern_defaults`` maps a pattern name to its family options (a dict or a
    function of (layout, two_stage)); each pattern's ``fit_defaults`` then adapts them to the
    grid. ``dense_first_steps`` and ``dense_layers`` (pattern name -> layers) are the schedule.

    LoRA: ``lora_adapter()`` returns the ``TrainableVideoModel`` subclass (imported on call; or
    a tuple of them when pipelines of the family need different adapters, e.g. Wan T2V and I2V),
    or ``None`` with ``lora_refusal`` saying why; ``lora_refusals`` maps pipeline class names of
    the family that train-lora refuses to the reason.

    Parallel: ``shard_plan`` (``None``: not supported, ``parallel_refusal`` says why);
    ``clip_decode``: how the family's VAE decodes one clip (``vidsparse.families.decode``; ``None``:
    ``run_parallel`` lets the pipeline decode the whole video on every rank); ``main_rank_decode``:
    pipeline steps ("<component>.<method>") that decode what only rank 0 keeps and that the pipeline
    runs after the video decode (LTX-2's audio: ``audio_vae.decode``, ``vocoder.forward``): under
    ``run_parallel`` they run on rank 0 only, the other ranks get an empty tensor.
    ``replicated_decode`` (non-empty: why): the family's pipelines read their own decoded frames
    back (Wan-Animate's next segment starts from the last one's end), so ``run_parallel`` decodes
    the whole video on every rank instead of per clip on rank 0. ``diffusers_cp_refusal``
    (non-empty: why): diffusers declares a ``_cp_plan`` for the family's transformer, but its
    context parallelism fails on what the family's pipelines pass, so ``--parallel ulysses``
    runs vidsparse's own Ulysses for it.

    Kernel order: ``kernel_order=True`` says that between the shard plan's cut points (its
    ``inputs`` / ``outputs`` in, its ``gather`` modules out) every operation but self-attention
    is per token (norms, FFN, cross-attention queries, per-token timestep embeddings, RoPE
    tables as cut), and that the family processor handles a kernel-order call. Then a sparse
    forward whose layers share one kernel order (``vidsparse.pipelines.hooks``) permutes the
    token sequence there once, every layer attends in that order (contiguous tiles, the Triton
    kernels' TMA path) and the output is permuted back. Families whose blocks mix tokens in
    caller order (joint text spans, VACE hints, frame packing) keep ``False``.

    Tiny: ``tiny`` (variant name -> ``TinyVariant``) and ``tiny_pipeline(seed, dtype, **kw)``
    (a whole random-init pipeline, or ``None``); ``tiny_geometries``: names of further
    geometries whose tiny pipeline ``tiny_pipeline(seed, dtype, variant=<name>)`` builds
    (``generate --model tiny-<name>``, e.g. Wan 2.2 TI2V-5B's "wan22-5b"); ``tiny_pipelines``: further
    tiny pipelines of the default geometry but another pipeline class, name -> that class, built by
    ``tiny_pipeline(seed, dtype, variant=<name>)`` (Wan's "wan-i2v": ``WanImageToVideoPipeline``);
    ``tiny_prompt_kwargs(pipe, prompt, negative_prompt)`` gives the call kwargs carrying hashed
    prompt embeddings for a tiny pipeline whose call does not take Wan's ``prompt_embeds`` /
    ``negative_prompt_embeds`` of ``config.text_dim`` (``None``: it does).

    Refused: ``unsupported`` (non-empty) records a transformer vidsparse recognises but cannot
    patch, and why; ``vidsparse.apply`` raises it, the supported-families text leaves it out.

    ``condition_video``: pipeline class -> the ``__call__`` kwargs that carry a conditioning video's
    frames (RGB PIL images, ``generate --condition-video``): each pipeline takes them its own way
    (LTX-Video's ``conditions=[LTXVideoCondition]``, Cosmos' ``video=``).

    ``own_attention_sparse(transformer, kwargs)``: why the model's own self-attention is not dense
    attention in this forward (Kandinsky 5's NABLA checkpoints), else ``None``. Then a layer whose
    vidsparse plan keeps every pair still runs vidsparse's kernel: ``SparseConfig.dense_when_full``
    hands such layers to the model's attention only where that computes the same, dense.

    ``needs_first_frame``: pipeline classes whose ``__call__`` gives ``image`` a default of ``None``
    but fails without an image or video (Cosmos video2world), so ``generate`` asks for ``--image``
    before any weight loads instead of letting the pipeline fail after them.
    """

    name: str
    transformer_classes: tuple[str, ...]
    pipeline_prefixes: tuple[str, ...]
    processor_names: tuple[str, ...]
    processor: Callable[..., SparseProcessor]
    attention_paths: AttentionPaths
    grid: Callable[[torch.nn.Module, dict[str, Any]], Grid | str | None]
    text_len: Callable[[torch.nn.Module, dict[str, Any]], int]
    text_position: str
    geometries: tuple[VideoGeometry, ...]
    geometry_variant: Callable[[Mapping[str, Any]], str] | None = None
    pattern_defaults: Mapping[str, PatternDefaults] = field(default_factory=dict)
    dense_first_steps: int | float = 0.25
    dense_layers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    lora_adapter: Callable[[], type | tuple[type, ...]] | None = None
    lora_refusal: str = ""
    lora_refusals: Mapping[str, str] = field(default_factory=dict)
    shard_plan: ShardPlan | None = None
    parallel_refusal: str = "not supported yet"
    clip_decode: ClipDecode | None = None
    main_rank_decode: tuple[str, ...] = ()
    replicated_decode: str = ""
    diffusers_cp_refusal: str = ""
    kernel_order: bool = False
    tiny: Mapping[str, TinyVariant] = field(default_factory=dict)
    tiny_pipeline: Callable[..., Any] | None = None
    tiny_prompt_kwargs: Callable[..., dict[str, Any]] | None = None
    tiny_geometries: tuple[str, ...] = ()
    tiny_pipelines: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    unsupported: str = ""
    needs_first_frame: tuple[str, ...] = ()
    own_attention_sparse: Callable[[torch.nn.Module, dict[str, Any]], str | None] | None = None
    condition_video: Mapping[str, Callable[[list], dict[str, Any]]] = field(default_factory=dict)
    # pipeline class -> check of its latent frame count (a problem sentence, or None if it runs)
    latent_frame_checks: Mapping[str, Callable[[int], str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.text_position not in ("none", "before", "after"):
            raise ValueError(
                f"Family {self.name!r}: text_position must be none/before/after, got {self.text_position!r}."
            )
        if not self.geometries:
            raise ValueError(f"Family {self.name!r} declares no VideoGeometry.")
        if self.lora_adapter is None and not self.lora_refusal:
            raise ValueError(f"Family {self.name!r}: give a lora_adapter or a lora_refusal saying why there is none.")
        if self.kernel_order and self.shard_plan is None:
            raise ValueError(
                f"Family {self.name!r}: kernel_order=True permutes at the shard plan's cut points; give one."
            )
        for attr in ("pattern_defaults", "dense_layers", "lora_refusals", "tiny", "tiny_pipelines"):
            object.__setattr__(self, attr, _frozen(getattr(self, attr)))

    # -- attention ------------------------------------------------------------------------
    def num_layers(self, transformer: torch.nn.Module) -> int:
        return len(self.attention_paths(transformer))

    def matches(self, transformer: Any) -> bool:
        """True if ``transformer`` is an instance of one of ``transformer_classes``."""
        import diffusers

        classes = tuple(c for c in (getattr(diffusers, n, None) for n in self.transformer_classes) if c is not None)
        return bool(classes) and isinstance(transformer, classes)

    # -- geometry -------------------------------------------------------------------------
    @property
    def geometry(self) -> VideoGeometry:
        """The default geometry (the family's main checkpoint)."""
        return self.geometries[0]

    def geometry_for(self, transformer_config: Mapping[str, Any] | None) -> VideoGeometry:
        """The geometry a transformer ``config.json`` describes (variant, then its patch size)."""
        geo = self.geometry
        if self.geometry_variant is not None and transformer_config:
            wanted = normalize_name(self.geometry_variant(transformer_config))
            geo = next((g for g in self.geometries if normalize_name(g.name) == wanted), geo)
        return geo.with_patch_from(transformer_config)

    # -- defaults -------------------------------------------------------------------------
    def pattern_options(
        self, pattern_name: str, layout: VideoLayout, block_size: int | None, two_stage: bool = False
    ) -> dict[str, Any]:
        """Options of pattern ``pattern_name`` for this family on this grid.

        The family's entry of ``pattern_defaults`` (none: ``{}``), adapted to the grid by the
        pattern class's ``fit_defaults`` (windows cover at most an axis, block sizes fit a frame).
        """
        from vidsparse.patterns import PATTERNS, normalize_pattern_name

        name = normalize_pattern_name(pattern_name)
        entry = self.pattern_defaults.get(name)
        opts = dict(entry(layout, two_stage) if callable(entry) else (entry or {}))
        cls = PATTERNS.get(name)
        return cls.fit_defaults(opts, layout, block_size) if cls is not None else opts

    def sparse_settings(self) -> dict[str, Any]:
        """This record's sparse-schedule fields, copied: ``pattern_defaults``, ``dense_first_steps``, ``dense_layers``.

        For a family that runs another's attention unchanged (SkyReels-V2, Wan VACE on Wan's), so its
        record takes them from that one home: ``Family(..., **WAN.sparse_settings())``.
        """
        return dict(
            pattern_defaults=dict(self.pattern_defaults),
            dense_first_steps=self.dense_first_steps,
            dense_layers=dict(self.dense_layers),
        )

    def default_schedule(self, pattern_name: str) -> tuple[int | float, tuple[int, ...]]:
        """(dense_first_steps, dense_layers) defaults of this family for a pattern."""
        from vidsparse.patterns import normalize_pattern_name

        name = normalize_pattern_name(pattern_name)
        if name == "dense":
            return 0, ()
        return self.dense_first_steps, tuple(self.dense_layers.get(name, ()))

    # -- LoRA / parallel ------------------------------------------------------------------
    def lora_adapter_class(self) -> type | tuple[type, ...]:
        """The family's ``TrainableVideoModel`` subclass(es), or a ValueError with ``lora_refusal``."""
        if self.lora_adapter is None:
            raise ValueError(f"vidsparse train-lora does not train {self.name}: {self.lora_refusal}.")
        return self.lora_adapter()

    def require_shard_plan(self) -> ShardPlan:
        if self.shard_plan is None:
            raise ValueError(f"vidsparse.parallel does not run {self.name}: {self.parallel_refusal}.")
        return self.shard_plan

    def describe(self) -> str:
        return f"{self.name} ({'/'.join(self.transformer_classes)})"


# -- helpers family modules share -------------------------------------------------------------

#: Pattern options for families without published tuned settings (CogVideoX, Mochi; LTX-Video
#: overrides the windows): Radial without decay or sink, Tile (2, 8, 8) in a (5, 3, 3) window,
#: GNA kernel (9, 25, 25) with stride 1. ``Pattern.fit_defaults`` adapts them to each grid.
GENERIC_PATTERN_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "radial": MappingProxyType({"decay_factor": 1.0, "sink": False}),
        "tile": MappingProxyType({"tile": (2, 8, 8), "window": (5, 3, 3)}),
        "gna": MappingProxyType({"kernel_size": (9, 25, 25), "stride": 1}),
    }
)


def native_window_defaults(geometry: VideoGeometry) -> Callable[[VideoLayout, bool], dict[str, Any]]:
    """FreeSwim's family default: ``base_grid`` = the latent (H, W) of the geometry's default video.

    FreeSwim gives every query a window of the model's training grid, so the family default is
    the grid of its native resolution (Wan 2.1 1.3B: 480x832 px -> (30, 52) tokens), not a fixed
    constant. The same base whatever the call's grid: on a grid larger than the base the window
    is the training-size window; on an axis no larger than the base it covers the whole axis
    (the pattern's own rule), so a native-size call runs dense-equivalent attention.
    """
    frames, height, width = geometry.default_video
    _, base_h, base_w = geometry.latent_grid(frames, height, width)

    def defaults(layout: VideoLayout, two_stage: bool) -> dict[str, Any]:
        return {"base_grid": (base_h, base_w)}

    return defaults


def indexed_paths(attr: str, sub: str, offset: int = 0) -> AttentionPaths:
    """Self-attention ``<attr>.<i>.<sub>`` of every block in ``model.<attr>``, layers from ``offset``."""

    def paths(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
        blocks = getattr(model, attr, None) or []
        return [(f"{attr}.{i}.{sub}", getattr(b, sub), offset + i) for i, b in enumerate(blocks)]

    return paths


def bcfhw_grid(patch_t: int, patch_h: int, patch_w: int, hidden_states: torch.Tensor) -> Grid:
    """Token grid of latents [B, C, F, H, W] after a (t, h, w) patchify."""
    _, _, f, h, w = hidden_states.shape
    return (f // patch_t, h // patch_h, w // patch_w)


def latent_grid(model: torch.nn.Module, kwargs: dict[str, Any]) -> Grid:
    """Token grid of the call's ``hidden_states`` (latents [B, C, F, H, W]) patchified as the
    transformer's config says: ``patch_size`` (t, h, w) as Wan's, or an int ``patch_size`` (h = w)
    with ``patch_size_t`` as HunyuanVideo's (absent: 1, as Mochi's). Extra condition channels
    (I2V latents, masks) leave the grid unchanged."""
    cfg = model.config
    patch = cfg.patch_size
    if isinstance(patch, int):
        patch = (cfg.get("patch_size_t") or 1, patch, patch)
    return bcfhw_grid(*patch, kwargs["hidden_states"])


def no_text(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """Text span of a cross-attention family: none in self-attention."""
    return 0


def joint_text(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """Text span of a joint-attention family: the prompt tokens (``encoder_hidden_states``)."""
    return int(kwargs["encoder_hidden_states"].shape[1])


__all__ = [
    "AttentionPaths",
    "Family",
    "GENERIC_PATTERN_DEFAULTS",
    "Grid",
    "PatternDefaults",
    "TINY_HEADS",
    "TINY_HEAD_DIM",
    "TINY_LATENT_CHANNELS",
    "TINY_TEXT_DIM",
    "TINY_TEXT_LEN",
    "Shard",
    "ShardPlan",
    "TinyRequest",
    "TinyVariant",
    "VideoGeometry",
    "bcfhw_grid",
    "tiny_dims",
    "tiny_masked_prompt_kwargs",
    "indexed_paths",
    "joint_text",
    "native_window_defaults",
    "no_text",
    "normalize_name",
]
