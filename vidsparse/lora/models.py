"""Which LoRA adapter trains a diffusers pipeline: ``load_model`` and ``adapter_for``.

The adapters (``TrainableVideoModel`` subclasses) live in ``vidsparse.lora.adapters``, one
module per family; each family record (``vidsparse.families``) names its adapter
(``Family.lora_adapter``) or says why it has none (``Family.lora_refusal``), and lists the
pipelines of the family train-lora refuses (``Family.lora_refusals``). This module reads only
the registry, so there is no import cycle between the adapters and the lookup.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vidsparse.families import families as registered_families
from vidsparse.families import family_of_pipeline
from vidsparse.lora.adapters.base import TrainableVideoModel, module_fingerprint

TINY_MODEL = "tiny"
TINY_RANDOM_MODEL = "tiny-random"


def refused() -> dict[str, str]:
    """Pipeline class name -> why train-lora refuses it (from every family record)."""
    out: dict[str, str] = {}
    for fam in registered_families():
        out.update(fam.lora_refusals)
    return out


def families() -> tuple[type[TrainableVideoModel], ...]:
    """Every supported family adapter, in registry order (families with a ``lora_adapter``)."""
    out: list[type[TrainableVideoModel]] = []
    for fam in registered_families():
        if fam.lora_adapter is not None:  # one adapter class, or several (Wan: text- and image-to-video)
            found = fam.lora_adapter()
            out += list(found) if isinstance(found, (tuple, list)) else [found]
    return tuple(out)


def load_model(model: str, dtype: torch.dtype = torch.float32) -> TrainableVideoModel:
    """The adapter for ``model``: ``"tiny"`` (the trained tiny model of the synthetic world),
    ``"tiny-random"`` / ``"tiny-<family>"`` (random-init), a hub id or a local diffusers pipeline folder."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"--model must be 'tiny', a hub id or a pipeline folder, got {model!r}.")
    if model == TINY_MODEL:
        from vidsparse.models.tiny_trained import load_trained_tiny

        pipe = load_trained_tiny(dtype)
    elif model == TINY_RANDOM_MODEL:
        from vidsparse.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0, dtype=dtype)
    elif model.startswith(TINY_MODEL + "-"):
        pipe = _tiny_family_pipeline(model, dtype)
    else:
        from diffusers import DiffusionPipeline

        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser())
        # Video VAEs encode in fp32 (Wan's and HunyuanVideo's model cards); the rest in ``dtype``.
        dtypes = {"default": dtype, "vae": torch.float32}
        import diffusers.utils.deprecation_utils as dep

        key = "dtype" if hasattr(dep, "_resolve_dtype") else "torch_dtype"  # torch_dtype is deprecated in 0.42
        pipe = DiffusionPipeline.from_pretrained(model, **{key: dtypes})
    return adapter_for(pipe, model)


def _tiny_family_pipeline(model: str, dtype: torch.dtype):
    """``tiny-<name>``: a family record's embedded random-init pipeline (as ``vidsparse generate``)."""
    from vidsparse.generation.model import tiny_family_pipeline

    family, variant, _ = tiny_family_pipeline(model)
    return family.tiny_pipeline(seed=0, dtype=dtype, **({"variant": variant} if variant is not None else {}))


def refusal(name: str, model_id: str) -> str | None:
    """Why train-lora does not train the pipeline class ``name`` (the whole error message), or ``None``."""
    adapters = families()
    supported = ", ".join(n for cls in adapters for n in cls.pipeline_classes)
    reasons = refused()
    if name in reasons:
        return (
            f"{model_id}: vidsparse train-lora does not train {name}: {reasons[name]}. "
            f"Supported: {supported} or --model tiny."
        )
    if any(name in cls.pipeline_classes for cls in adapters):
        return None
    family = family_of_pipeline(name)
    if family is not None and family.lora_adapter is None:  # a pipeline of a family without an adapter
        return (
            f"{model_id}: vidsparse train-lora does not train {name} ({family.name}): {family.lora_refusal}. "
            f"Supported: {supported} or --model tiny."
        )
    return (
        f"{model_id}: pipeline {name} is not supported by vidsparse train-lora yet; supported: {supported} "
        "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or --model tiny."
    )


def check_trainable(model: str) -> None:
    """Refuse ``--model`` from its configuration files alone (``model_index.json``'s pipeline class),
    before any work: no output folder, no weights, no encoding. Tiny names are checked by the class
    their family record builds."""
    from vidsparse.generation.model import pipeline_class_of

    if not isinstance(model, str) or not model:
        raise ValueError(f"--model must be 'tiny', a hub id or a pipeline folder, got {model!r}.")
    why = refusal(pipeline_class_of(model), model)
    if why is not None:
        raise ValueError(why)


def check_clip_size(model: str, frames: int, height: int, width: int) -> None:
    """Refuse a clip size the model's VAE and patchify cannot take, from its configuration files
    alone (the sizes ``generate`` checks), before the output folder or any weights exist. Rules
    only an adapter knows (an image-to-video bucket) are checked by it after loading."""
    from vidsparse.generation.model import resolve_model

    try:
        resolve_model(model).grid.check_video(frames, height, width)
    except ValueError as exc:
        raise ValueError(f"--num-frames/--height/--width: {exc} Train at a size the model generates.") from None


def check_condition_frames(model: str, frames: int | None) -> None:
    """Refuse ``--condition-frames`` for a pipeline that takes no conditioning video, from its class alone."""
    if frames is None:
        return
    from vidsparse.generation.model import pipeline_class_of

    name = pipeline_class_of(model)
    cls = next((c for c in families() if name in c.pipeline_classes), None)
    if cls is None or not cls.takes_condition_frames:
        takes = ", ".join(n for c in families() if c.takes_condition_frames for n in c.pipeline_classes)
        raise ValueError(
            f"--condition-frames {frames}: {model} is a {name}, which takes no conditioning video; it is for "
            f"{takes} (e.g. --model tiny-ltx-condition). Drop --condition-frames."
        )


def adapter_for(pipe, model_id: str) -> TrainableVideoModel:
    """The family adapter of a loaded diffusers pipeline (by its class name)."""
    name = type(pipe).__name__
    why = refusal(name, model_id)
    if why is not None:
        raise ValueError(why)
    return next(cls for cls in families() if name in cls.pipeline_classes)(pipe, model_id)


__all__ = [
    "TINY_MODEL",
    "TINY_RANDOM_MODEL",
    "TrainableVideoModel",
    "adapter_for",
    "check_condition_frames",
    "check_trainable",
    "families",
    "load_model",
    "module_fingerprint",
    "refusal",
    "refused",
]
