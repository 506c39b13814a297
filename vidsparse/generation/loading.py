"""Loading the pipeline of a ``GenerationPlan``: weights (or the tiny pipeline), LoRA, compile."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from vidsparse.errors import brief
from vidsparse.generation.model import TINY
from vidsparse.generation.options import GenerationPlan


def load_pipeline(plan: GenerationPlan, seed: int = 0):
    """The diffusers pipeline of ``plan`` in its dtype, on the CPU (placement is the caller's).

    "tiny" is the trained pipeline shipped in the package (``vidsparse.models.tiny_trained``); the
    random-init tiny pipelines are built in memory with fixed weights (seed 0 whatever ``seed``
    is), so that ``--seed`` changes only the noise, as it does for a real checkpoint.
    """
    info = plan.info
    if info.kind == TINY and info.source == TINY:
        from vidsparse.models.tiny_trained import load_trained_tiny

        pipe = load_trained_tiny(plan.dtype)
    elif info.kind == TINY:  # "tiny-random" / "tiny-<family>": the family record's random-init pipeline
        family = info.model_family
        variant = {"variant": info.tiny_variant} if info.tiny_variant is not None else {}
        pipe = family.tiny_pipeline(seed=0, dtype=plan.dtype, **variant)
    else:
        from diffusers import DiffusionPipeline

        # diffusers >= 0.42 names the argument ``dtype`` (``torch_dtype`` is deprecated there).
        doc = DiffusionPipeline.from_pretrained.__doc__ or ""
        kwargs: dict[str, Any] = {"dtype" if "    dtype (" in doc else "torch_dtype": plan.dtype}
        # Components saved as [null, null] (e.g. a pipeline without text encoder) must be passed as None.
        kwargs.update({name: None for name in info.absent_components})
        try:
            pipe = DiffusionPipeline.from_pretrained(info.source, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"Could not load the pipeline {info.source!r}: {brief(exc)}.") from None
    return pipe


def place_pipeline(pipe, device) -> None:
    """``pipe.to(device)``, skipped when every module is already there: pipelines are loaded on
    the CPU, and diffusers' ``to("cpu")`` of a float16 pipeline logs, per module, that float16
    cannot run on a CPU (it does, with torch >= 2.1), which a CPU run would print three times."""
    import torch

    device = torch.device(device)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    params = (p for m in modules for p in itertools.chain(m.parameters(), m.buffers()))
    if all(p.device == device for p in params):
        return
    pipe.to(device)


def load_lora(pipe, path: Path, scale: float) -> None:
    """Load a diffusers-format LoRA and check that it actually attached to the transformer.

    A train-lora folder of a two-expert Wan 2.2 run also holds the low-noise expert's file
    (``LORA_WEIGHT_NAME_2``); it is loaded into ``transformer_2`` (``load_into_transformer_2``).
    """
    from vidsparse.lora.export import (
        expert_lora_file,
        load_transformer_lora,
        lora_shape_mismatch,
        read_lora_info,
        resolve_lora_path,
        set_lora_scale,
    )

    before = _adapter_count(pipe)
    folder, weight_name = resolve_lora_path(path)
    second = expert_lora_file(folder, weight_name)
    pairs = [(getattr(pipe, "transformer", None), folder / weight_name)]
    if second is not None and getattr(pipe, "transformer_2", None) is not None:
        pairs.append((pipe.transformer_2, second))
    for module, file in pairs:
        wrong = lora_shape_mismatch(module, file) if module is not None else None
        if wrong:
            trained = (read_lora_info(path) or {}).get("model")
            on = f" It was trained on --model {trained} (its vidsparse_lora.json)." if trained else ""
            raise ValueError(
                f"--lora {str(path)!r} was trained for a model with other layer sizes: {wrong}.{on} "
                "Use the model it was trained on, or train a LoRA for this one."
            )
    try:
        if second is not None and getattr(pipe, "transformer_2", None) is None:
            raise ValueError(
                f"it holds a LoRA per Wan 2.2 expert ({second.name}) and this pipeline has no transformer_2"
            )
        load_transformer_lora(pipe, folder, weight_name, "vidsparse_lora")
        if second is not None:
            pipe.load_lora_weights(str(folder), weight_name=second.name, adapter_name="vidsparse_lora",
                                   load_into_transformer_2=True)  # fmt: skip
    except Exception as exc:
        raise ValueError(
            f"--lora {str(path)!r} does not match this {type(pipe).__name__}: {type(exc).__name__}: "
            f"{brief(exc)}. Use a LoRA trained for this model (diffusers format)."
        ) from None
    if _adapter_count(pipe) <= before:
        raise ValueError(
            f"--lora {str(path)!r} loaded no weights into this {type(pipe).__name__}: none of its keys name a "
            "layer of this model. Use a LoRA trained for this model, saved in diffusers format."
        )
    if scale != 1.0:
        set_lora_scale(pipe, "vidsparse_lora", scale)


def _adapter_count(pipe) -> int:
    total = 0
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        total += sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)
    return total


def compile_pipeline(pipe) -> None:
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        if hasattr(module, "compile_repeated_blocks") and getattr(module, "_repeated_blocks", None):
            module.compile_repeated_blocks(fullgraph=False)
        else:
            module.compile()


__all__ = ["compile_pipeline", "load_lora", "load_pipeline"]
