"""Save a trained LoRA in diffusers' format and load it back into a pipeline.

The weights file is what diffusers' own LoRA training scripts write: PEFT-style keys
(``transformer.blocks.0.attn1.to_q.lora_A.weight``) through the pipeline class's
``save_lora_weights`` (``lora_writer``: a pipeline without LoRA loading in diffusers, such as
HunyuanVideo 1.5's, gets the same transformer-only file), with the adapter config (rank, alpha, targets) in the safetensors
metadata so that ``pipe.load_lora_weights(path)`` restores the exact ``alpha / rank`` scale.
A small ``vidsparse_lora.json`` beside it records how it was trained (pattern, frames, size),
so ``vidsparse generate --lora`` can tell the user what the LoRA expects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vidsparse.atomic import fsync_dir, write_json

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: the low-noise expert's LoRA of a two-expert Wan 2.2 pipeline (``load_into_transformer_2=True``)
LORA_WEIGHT_NAME_2 = "pytorch_lora_weights_transformer_2.safetensors"
INFO_NAME = "vidsparse_lora.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def lora_state_dict(transformer: torch.nn.Module, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The adapter weights of ``transformer`` with PEFT keys (no ``transformer.`` prefix)."""
    from peft.utils import get_peft_model_state_dict

    if dtype not in _DTYPES:
        raise ValueError(f"save dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    sd = get_peft_model_state_dict(unwrap(transformer))
    return {k: v.detach().to("cpu", _DTYPES[dtype]).contiguous() for k, v in sd.items()}


def lora_writer(pipeline_class: type) -> type:
    """The class whose ``save_lora_weights`` writes ``pipeline_class``'s LoRA file.

    The pipeline's own when it has one. A pipeline diffusers gives no LoRA loader
    (``HunyuanVideo15Pipeline`` in 0.42) but whose transformer loads adapters
    (``PeftAdapterMixin.load_lora_adapter``) gets diffusers' transformer-only writer, here
    HunyuanVideo's: the file is the same (``transformer.``-prefixed PEFT keys, the adapter config
    in the metadata), and ``load_transformer_lora`` reads it back.
    """
    if hasattr(pipeline_class, "save_lora_weights"):
        return pipeline_class
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    return HunyuanVideoLoraLoaderMixin


def load_transformer_lora(pipe, folder: str | os.PathLike, weight_name: str | None, adapter_name: str) -> None:
    """``pipe.load_lora_weights`` or, for a pipeline without it (see ``lora_writer``), the transformer's
    ``load_lora_adapter`` of the same file; a TypeError when neither can load it."""
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
        return
    transformer = getattr(pipe, "transformer", None)
    if not hasattr(transformer, "load_lora_adapter"):
        raise TypeError(
            f"{type(pipe).__name__} cannot load LoRA weights (no load_lora_weights, and its transformer no "
            "load_lora_adapter); pass a diffusers pipeline."
        )
    transformer.load_lora_adapter(str(folder), weight_name=weight_name, prefix="transformer", adapter_name=adapter_name)


def lora_shape_mismatch(module: torch.nn.Module, file: str | os.PathLike, prefix: str = "transformer") -> str | None:
    """The first LoRA tensor of ``file`` whose shape does not fit the layer of ``module`` it names, or None.

    Read from the safetensors header (no tensor loads), before diffusers' loader: a LoRA trained on a
    model of the same family at other widths (e.g. ``tiny`` vs ``tiny-random``) names the right
    layers at the wrong sizes, and diffusers reports that as a page of per-layer size errors.
    Keys in other formats, or naming no layer of ``module``, are left to diffusers' loader.
    """
    from safetensors import safe_open

    module = unwrap(module)
    with safe_open(str(file), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        for key in names:
            head, _, rest = key.partition(".")
            if head != prefix or not rest.endswith((".lora_A.weight", ".lora_B.weight")):
                continue
            name, which = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
            try:
                layer = module.get_submodule(name)
            except AttributeError:
                continue
            base = getattr(layer, "base_layer", layer)  # already wrapped by PEFT
            if not hasattr(base, "in_features"):
                continue
            shape = tuple(f.get_slice(key).get_shape())
            expected, dim = (base.in_features, 1) if which == "A" else (base.out_features, 0)
            if len(shape) != 2 or shape[dim] != expected:
                side = "input" if which == "A" else "output"
                return (
                    f"{key} is {list(shape)}, for a layer with {shape[dim] if len(shape) == 2 else '?'} {side} "
                    f"features; this model's {name} has {expected}"
                )
    return None


def set_lora_scale(pipe, adapter_name: str, scale: float) -> None:
    """``pipe.set_adapters`` (or the transformer's, for a pipeline without LoRA loading) at ``scale``."""
    if hasattr(pipe, "set_adapters"):
        pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])
    else:
        pipe.transformer.set_adapters([adapter_name], weights=[float(scale)])


def save_lora(
    output_dir: str | os.PathLike,
    pipeline_class: type,
    transformer: torch.nn.Module,
    info: dict[str, Any] | None = None,
    dtype: str = "fp32",
    weight_name: str = LORA_WEIGHT_NAME,
) -> Path:
    """Write ``weight_name`` (+ ``vidsparse_lora.json``) atomically; returns the file.

    A two-expert Wan 2.2 run writes one file per expert: ``LORA_WEIGHT_NAME`` (``transformer``)
    and ``LORA_WEIGHT_NAME_2`` (``transformer_2``), each with ``transformer.`` keys, as diffusers'
    ``load_lora_weights(..., load_into_transformer_2=True)`` expects the second one.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(transformer)
    if not getattr(model, "peft_config", None):
        raise ValueError("The transformer has no LoRA adapter to save; add one with transformer.add_adapter(...).")
    adapter = next(iter(model.peft_config))
    metadata = {"transformer_lora_adapter_metadata": model.peft_config[adapter].to_dict()}
    tmp_dir = Path(tempfile.mkdtemp(prefix=".lora-", dir=out))
    try:
        lora_writer(pipeline_class).save_lora_weights(
            tmp_dir, transformer_lora_layers=lora_state_dict(model, dtype), weight_name=weight_name, **metadata
        )
        with open(tmp_dir / weight_name, "rb+") as fh:
            os.fsync(fh.fileno())
        # Written inside a private (mkdtemp) folder; give it the mode a plain write would (0644 under
        # umask 022), like every other output, before it moves into place.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir / weight_name, 0o666 & ~umask)
        os.replace(tmp_dir / weight_name, out / weight_name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if info is not None:
        write_json(out / INFO_NAME, info)
    return out / weight_name


def expert_lora_file(folder: str | os.PathLike, weight_name: str | None) -> Path | None:
    """The low-noise expert's LoRA beside ``weight_name`` (a two-expert Wan 2.2 run), or None."""
    if weight_name != LORA_WEIGHT_NAME:
        return None
    path = Path(folder) / LORA_WEIGHT_NAME_2
    return path if path.is_file() else None


def resolve_lora_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder or file for ``load_lora_weights``, weight_name) from a folder or a .safetensors path."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"LoRA file {str(p)!r} is not a .safetensors file; pass the file or its folder.")
        return p.parent, p.name
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            return p, LORA_WEIGHT_NAME
        files = sorted(f.name for f in p.glob("*.safetensors") if f.name != LORA_WEIGHT_NAME_2)
        if len(files) == 1:
            return p, files[0]
        raise ValueError(
            f"LoRA folder {str(p)!r} has no {LORA_WEIGHT_NAME}"
            + (f" and several .safetensors files ({', '.join(files)}); pass the file itself." if files else ".")
        )
    raise ValueError(f"LoRA path {str(p)!r} does not exist; pass a train-lora output folder or a .safetensors file.")


def read_lora_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``vidsparse_lora.json`` beside a LoRA (None for LoRAs trained elsewhere)."""
    folder, _ = resolve_lora_path(path)
    info = folder / INFO_NAME
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_lora(pipe, path: str | os.PathLike, scale: float = 1.0, adapter_name: str = "vidsparse") -> str:
    """Load a LoRA into ``pipe`` (``load_transformer_lora``) and set its scale; returns the adapter name."""
    folder, weight_name = resolve_lora_path(path)
    existing = set()
    if hasattr(pipe, "get_list_adapters"):
        for names in pipe.get_list_adapters().values():
            existing.update(names)
    else:  # a pipeline without LoRA loading: its transformer's adapters
        existing.update(getattr(getattr(pipe, "transformer", None), "peft_config", None) or {})
    name, i = adapter_name, 1
    while name in existing:
        i += 1
        name = f"{adapter_name}_{i}"
    load_transformer_lora(pipe, folder, weight_name, name)
    second = expert_lora_file(folder, weight_name)
    if second is not None:
        if getattr(pipe, "transformer_2", None) is None:
            raise ValueError(
                f"LoRA {str(folder)!r} holds one LoRA per Wan 2.2 expert ({second.name} is transformer_2's), but "
                f"{type(pipe).__name__} has no transformer_2; load it into the two-expert pipeline it was trained on."
            )
        pipe.load_lora_weights(str(folder), weight_name=second.name, adapter_name=name, load_into_transformer_2=True)
    if scale != 1.0:
        set_lora_scale(pipe, name, scale)
    return name


__all__ = [
    "INFO_NAME",
    "LORA_WEIGHT_NAME",
    "LORA_WEIGHT_NAME_2",
    "expert_lora_file",
    "load_lora",
    "load_transformer_lora",
    "lora_shape_mismatch",
    "lora_state_dict",
    "lora_writer",
    "read_lora_info",
    "resolve_lora_path",
    "save_lora",
    "set_lora_scale",
]
