"""Where the trained tiny model lives in the package, and how ``--model tiny`` loads it.

The weights are a diffusers pipeline folder (``model_index.json``, one sub-folder per component,
fp16 safetensors) written by ``python -m vidsparse.models.train_tiny``; loading is the real path,
``WanPipeline.from_pretrained(folder)``, offline. ``reference.json`` beside them records one
generation of the saved weights (prompt, seed, sizes, per-frame colour means and a thumbnail), so a
test can check that the shipped weights still reproduce it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vidsparse.models.synthetic_world import HEIGHT, TRAIN_FRAMES, WIDTH

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "tiny"
REFERENCE_FILE = "reference.json"

#: Call defaults of the trained model: the size it was trained at, and its sampler settings.
TRAINED_DEFAULTS = {"frames": TRAIN_FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 12, "guidance": 4.0}


def weights_dir(folder: str | Path | None = None) -> Path:
    """The trained tiny pipeline folder (``folder`` or the shipped one); raises if it is missing."""
    path = Path(folder) if folder is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The trained tiny model is not at {path} (no model_index.json). Reinstall vidsparse (the weights are "
            "package data), or train them: python -m vidsparse.models.train_tiny --out DIR; "
            "--model tiny-random is the random-init pipeline that needs no weights."
        )
    return path


def load_trained_tiny(dtype: torch.dtype = torch.float32, folder: str | Path | None = None):
    """The trained tiny ``diffusers.WanPipeline`` (weights stored in fp16, cast to ``dtype``)."""
    import diffusers.utils.deprecation_utils as dep
    from diffusers import WanPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    import vidsparse.models.tiny_vae  # noqa: F401
    import vidsparse.models.tiny_wan_model  # noqa: F401  diffusers loads custom classes only from imported modules

    key = "dtype" if hasattr(dep, "_resolve_dtype") else "torch_dtype"  # torch_dtype is deprecated in 0.42
    level, bars = dlogging.get_verbosity(), dlogging.is_progress_bar_enabled()
    dlogging.set_verbosity_error()  # no "Expected types for vae / transformer" line: the tiny classes by design
    dlogging.disable_progress_bar()  # no "Loading pipeline components" bar for a 1 MB model
    tbars = tlogging.is_progress_bar_enabled()
    tlogging.disable_progress_bar()  # nor transformers' "Loading weights" one (the text encoder)
    try:
        pipe = WanPipeline.from_pretrained(str(weights_dir(folder)), **{key: dtype})
    finally:
        dlogging.set_verbosity(level)
        if bars:
            dlogging.enable_progress_bar()
        if tbars:
            tlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def thumbnail(frames, cells: tuple[int, int] = (6, 10)) -> list[list[list[float]]]:
    """Per-frame block means [F][cells][3] in [0, 1] of RGB frames [F, H, W, 3]: a compact
    fingerprint of a generation that tolerates tiny numeric differences."""
    import numpy as np

    video = np.asarray(frames, dtype=np.float32)
    video = video / 255.0 if video.max() > 1.5 else video
    f, h, w, _ = video.shape
    ch, cw = cells
    blocks = video[:, : h - h % ch, : w - w % cw].reshape(f, ch, h // ch, cw, w // cw, 3).mean((2, 4))
    return blocks.reshape(f, ch * cw, 3).round(4).tolist()


__all__ = ["REFERENCE_FILE", "TRAINED_DEFAULTS", "WEIGHTS_DIR", "load_trained_tiny", "thumbnail", "weights_dir"]
