"""LoRA length adaptation: fine-tune a video model for longer clips under a sparse pattern.

``train_lora(TrainConfig(...))`` (or ``vidsparse train-lora``) trains; ``load_lora(pipe, path)``
loads the result into a diffusers pipeline. See docs/lora.md for the recipe.
"""

from vidsparse.lora.cache import CacheReport, LatentCache
from vidsparse.lora.config import TrainConfig
from vidsparse.lora.data import ClipSpec, VideoReadError, VideoSample, read_clip, scan_dataset
from vidsparse.lora.export import INFO_NAME, LORA_WEIGHT_NAME, load_lora, read_lora_info, save_lora
from vidsparse.lora.flow import NoiseSampler, add_noise, shift_sigmas
from vidsparse.lora.train import TrainResult, flow_loss, prepare_cache, train_lora

__all__ = [
    "INFO_NAME",
    "LORA_WEIGHT_NAME",
    "CacheReport",
    "ClipSpec",
    "LatentCache",
    "NoiseSampler",
    "TrainConfig",
    "TrainResult",
    "VideoReadError",
    "VideoSample",
    "add_noise",
    "flow_loss",
    "load_lora",
    "prepare_cache",
    "read_clip",
    "read_lora_info",
    "save_lora",
    "scan_dataset",
    "shift_sigmas",
    "train_lora",
]
