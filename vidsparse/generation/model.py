"""Which model ``--model`` names, from its configuration files only (no weights loaded).

``resolve_model`` accepts "tiny" (the embedded trained Wan pipeline of the synthetic world,
``vidsparse.models.tiny_trained``), "tiny-random" / "tiny-<family>" (embedded random-init
pipelines), a local diffusers pipeline folder or a hub id; it reads ``model_index.json`` and ``transformer/config.json``,
finds the family by pipeline class (``vidsparse.families.family_of_pipeline``) and its video
geometry (``Family.geometry_for``), and the pipeline's own call defaults.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidsparse.errors import brief
from vidsparse.families import (
    Family,
    VideoGeometry,
    families,
    family_of_geometry,
    family_of_pipeline,
    pipeline_prefixes,
    tiny_pipeline_of,
    video_geometry,
)

TINY = "tiny"
#: The random-init tiny Wan pipeline (what "tiny" was before the trained model): fast, for tests.
TINY_RANDOM = "tiny-random"
# Random-init tiny pipelines: small enough for a CPU (benchmarks/results/tiny_generate_cpu.md), big
# enough (9x6x10 latent tokens, 540) for visible sparsity.
TINY_DEFAULTS = {"frames": 33, "height": 96, "width": 160, "steps": 8, "guidance": 5.0}


@dataclass(frozen=True)
class ModelInfo:
    """What is known about --model before loading it."""

    kind: str  # "tiny" | "local" | "hub"
    source: str
    pipeline_class: str
    grid: VideoGeometry
    defaults: Mapping[str, Any]
    two_stage: bool = False
    absent_components: tuple[str, ...] = ()  # model_index entries saved as [null, null]
    tiny_variant: str | None = None  # tiny: the ``variant`` of ``Family.tiny_pipeline`` (None: its default)

    @property
    def family(self) -> str:
        """The geometry's name ("cogvideox1.5" for CogVideoX 1.5): what summaries report."""
        return self.grid.name

    @property
    def model_family(self) -> Family:
        """The family record serving this model (``vidsparse.families``)."""
        return family_of_geometry(self.grid)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(model: str) -> bool:
    """A relative/absolute/home path rather than a hub id (org/name has exactly one slash)."""
    return model.startswith((".", "/", "~")) or model.count("/") >= 2 or "\\" in model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Could not read {path}: {exc}.") from None


def _hub_reachable(timeout_s: float = 3.0) -> str | None:
    """``None`` if a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens within ``timeout_s``,
    else why not; checked once, so an unreachable hub costs seconds, not the client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc or type(exc).__name__}"
    return None


def _hub_json(repo: str, filename: str, required: bool) -> dict[str, Any] | None:
    """A config file of a hub model: from the local cache if there, else downloaded (one short
    reachability check first; a missing model is one line saying how to get it)."""
    import logging

    from huggingface_hub import constants, hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(repo, filename, local_files_only=True)))
    except Exception:  # not cached (or the cache is broken): try the hub below
        pass
    how = (
        f"Download it where the hub can be reached (`hf download {repo}`; gated models need `hf auth login` "
        "first), then HF_HUB_OFFLINE=1 uses the local cache; or pass a local diffusers pipeline folder, "
        "or --model tiny."
    )
    if constants.is_offline_mode():
        if not required:
            return None
        raise ValueError(f"--model {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    unreachable = _hub_reachable()
    if unreachable is not None:
        if not required:
            return None
        raise ValueError(
            f"--model {repo!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({unreachable}). {how}"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no retry lines with URLs: the error below says what failed
    try:
        return _read_json(Path(hf_hub_download(repo, filename, etag_timeout=5)))
    except Exception as exc:  # missing repo or file, auth, network: all mean "cannot use this id"
        if not required:
            return None
        raise ValueError(
            f"Could not get {filename} of the hub model {repo!r}: {type(exc).__name__}: {brief(exc, 1)}. "
            f"Check the id (and access: gated models need `hf auth login`). {how}"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _family_from_class(class_name: str, transformer_config: dict[str, Any] | None) -> VideoGeometry:
    family = family_of_pipeline(class_name)
    if family is not None and family.unsupported:  # refuse before loading any weights
        raise ValueError(f"vidsparse generate cannot run a {class_name}: {family.unsupported}.")
    if family is not None:
        return family.geometry_for(transformer_config)
    supported = ", ".join(f"{p}*Pipeline" for p in pipeline_prefixes())
    raise ValueError(
        f"vidsparse generate runs video diffusion pipelines of these families: {supported}; "
        f"this model is a {class_name}."
    )


def _call_defaults(class_name: str) -> dict[str, Any]:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return {}
    params = inspect.signature(cls.__call__).parameters
    # WanAnimatePipeline has no num_frames: its frames per transformer call are segment_frame_length.
    names = {"num_frames": "frames", "segment_frame_length": "frames", "height": "height", "width": "width"}
    names.update({"num_inference_steps": "steps", "guidance_scale": "guidance"})
    out = {}
    for src, dst in names.items():
        p = params.get(src)
        if p is not None and p.default is not inspect.Parameter.empty and p.default is not None:
            out[dst] = p.default
    return out


def tiny_models() -> tuple[str, ...]:
    """``--model`` names of the embedded tiny pipelines: "tiny" (the trained Wan), "tiny-random"
    (the random-init Wan), "tiny-<family>", "tiny-<geometry>" for a family's ``tiny_geometries``
    (e.g. "tiny-wan22-5b") and "tiny-<name>" for its ``tiny_pipelines`` (e.g. "tiny-wan-i2v");
    all but "tiny" are random-init."""
    names = [TINY, TINY_RANDOM]
    for f in families():
        if f.tiny_pipeline is not None:
            names += [f"{TINY}-{n}" for n in (f.name, *f.tiny_geometries, *f.tiny_pipelines)]
    return tuple(names)


def _tiny_hint(model: str) -> str:
    """The sentence " Did you mean 'tiny-hunyuan'?" for a near miss of an embedded tiny name (case included), else ""."""
    names = tiny_models()
    lowered = model.lower()
    close = [lowered] if lowered in names else difflib.get_close_matches(lowered, names, n=1, cutoff=0.75)
    return f" Did you mean {close[0]!r}?" if close else ""


def tiny_family_pipeline(model: str) -> tuple[Family, str | None, str]:
    """(family, variant, pipeline class) of ``--model tiny-<name>`` (``families.tiny_pipeline_of``),
    or a ValueError listing the embedded ones (``generate`` and ``train-lora`` read it the same)."""
    found = tiny_pipeline_of(model[len(TINY) + 1 :])
    if found is None:
        embedded = ", ".join(tiny_models())
        raise ValueError(f"--model {model!r}: no such tiny pipeline.{_tiny_hint(model)} Embedded ones: {embedded}.")
    return found


def _tiny_model(model: str) -> ModelInfo:
    """``tiny-<name>``: a family record's random-init pipeline."""
    family, variant, pipeline_class = tiny_family_pipeline(model)
    geo = family.geometry
    if variant in family.tiny_geometries:
        geo = next(g for g in family.geometries if g.name == variant)
    if family.name == "wan" and geo is family.geometry:
        defaults = dict(TINY_DEFAULTS)
    else:  # a small valid video: 2 latent frames past the first (or the fewest the pipeline takes), 6x10 tokens
        ph, pw = geo.patch[1:]
        latent_frames, check = 3, family.latent_frame_checks.get(pipeline_class)
        while check is not None and check(latent_frames):
            latent_frames += 1
        defaults = dict(frames=1 + (latent_frames - 1) * geo.temporal, height=6 * geo.spatial * ph,
                        width=10 * geo.spatial * pw, steps=TINY_DEFAULTS["steps"], guidance=TINY_DEFAULTS["guidance"])  # fmt: skip
    return ModelInfo(TINY, model, pipeline_class, geo, defaults, tiny_variant=variant)


def read_model_config(model: str) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(kind "local" | "hub", ``model_index.json``, ``transformer/config.json`` or ``None``) of a
    pipeline folder or hub id, reading no weights; a ValueError saying how to fix a bad ``model``."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"--model {model!r} is a file; expected a diffusers pipeline folder (with model_index.json), "
                "a hub id like Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 'tiny'."
            )
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ValueError(
                f"--model {model!r} is not a diffusers pipeline folder: it has no model_index.json. Point it at the "
                "folder that pipe.save_pretrained() wrote (or a downloaded snapshot)."
            )
        index = _read_json(index_file)
        tcfg_file = path / "transformer" / "config.json"
        tcfg = _read_json(tcfg_file) if tcfg_file.is_file() else None
        return "local", index, tcfg
    if _looks_like_path(model) or not _HUB_ID.match(model):
        raise ValueError(
            f"--model {model!r}: no such folder, and it is not a hub id (org/name).{_tiny_hint(model)} Give an "
            "existing diffusers pipeline folder, a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 'tiny'."
        )
    index = _hub_json(model, "model_index.json", required=True)
    tcfg = _hub_json(model, "transformer/config.json", required=False)
    return "hub", index, tcfg


def pipeline_class_of(model: str) -> str:
    """The diffusers pipeline class ``--model`` names (tiny names included), from its config files only."""
    if model in (TINY, TINY_RANDOM):
        return "WanPipeline"
    if model.startswith(TINY + "-"):
        return tiny_family_pipeline(model)[2]
    class_name = str(read_model_config(model)[1].get("_class_name", ""))
    if not class_name:
        raise ValueError(f"--model {model!r}: model_index.json names no pipeline class (_class_name).")
    return class_name


def resolve_model(model: str) -> ModelInfo:
    """Identify --model from its configuration files only (tiny, local folder, or hub id)."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("--model must be 'tiny', a local diffusers pipeline folder or a hub id like org/name.")
    model = model.strip()
    if model == TINY:  # the trained model of the synthetic world (shipped weights)
        from vidsparse.models.tiny_trained import TRAINED_DEFAULTS

        return ModelInfo(TINY, TINY, "WanPipeline", video_geometry("wan"), dict(TRAINED_DEFAULTS))
    if model == TINY_RANDOM:
        return ModelInfo(TINY, TINY_RANDOM, "WanPipeline", video_geometry("wan"), dict(TINY_DEFAULTS))
    if model.startswith(TINY + "-"):
        return _tiny_model(model)
    kind, index, tcfg = read_model_config(model)
    class_name = str(index.get("_class_name", ""))
    if not class_name:
        raise ValueError(f"--model {model!r}: model_index.json names no pipeline class (_class_name).")
    grid = _family_from_class(class_name, tcfg)
    t2 = index.get("transformer_2")
    two_stage = isinstance(t2, (list, tuple)) and any(x is not None for x in t2)
    absent = tuple(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)) and not any(v))
    return ModelInfo(kind, model, class_name, grid, _call_defaults(class_name), two_stage, absent)


__all__ = [
    "TINY",
    "TINY_DEFAULTS",
    "TINY_RANDOM",
    "ModelInfo",
    "pipeline_class_of",
    "read_model_config",
    "resolve_model",
    "tiny_family_pipeline",
    "tiny_models",
]
