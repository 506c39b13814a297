"""Training videos: a folder of clips with captions, read into fixed-size pixel tensors.

Layout of a dataset folder (sub-folders are searched too; hidden ones are skipped)::

    data/
      clip_a.mp4   clip_a.txt      # caption beside the video, same name
      clip_b.webm  clip_b.txt
      anim.gif
      metadata.jsonl               # optional: {"file_name": "anim.gif", "text": "..."} per line
      metadata.csv                 # optional: columns file_name,text

Captions from ``metadata.jsonl`` / ``metadata.csv`` (the Hugging Face "videofolder" layout) take
precedence over ``.txt`` files. A video without a caption is reported and skipped rather than
trained on an empty prompt, which would silently teach the LoRA unconditional generation.

Each clip becomes ``num_frames`` frames taken every ``frame_stride`` source frames from the
start, resized so that it covers ``height`` x ``width`` (aspect ratio kept) and center-cropped:
pixels in [-1, 1] as [3, F, H, W], the layout diffusers VAEs encode.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")
#: The formats as messages name them ("mp4, webm, ...").
VIDEO_FORMATS = ", ".join(ext[1:] for ext in VIDEO_EXTENSIONS)
CAPTION_COLUMNS = ("text", "caption", "prompt")
FILE_COLUMNS = ("file_name", "video", "path", "file")


class VideoReadError(RuntimeError):
    """A video that cannot be used for training (unreadable, too short, ...); carries the file name."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(frozen=True)
class VideoSample:
    """One training video and its caption; ``relpath`` (POSIX) identifies it inside the dataset."""

    path: Path
    relpath: str
    caption: str


@dataclass(frozen=True)
class ClipSpec:
    """How a video becomes a training clip: frame count, sampling stride and pixel size."""

    num_frames: int
    height: int
    width: int
    frame_stride: int = 1

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "frame_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive int, got {value!r}.")

    @property
    def source_frames(self) -> int:
        """Frames a source video needs for one clip."""
        return (self.num_frames - 1) * self.frame_stride + 1


@dataclass(frozen=True)
class DatasetScan:
    """Result of scanning a dataset folder: usable samples and (file, reason) for skipped ones."""

    samples: tuple[VideoSample, ...]
    skipped: tuple[tuple[str, str], ...]


def _read_metadata(root: Path, caption_column: str | None) -> dict[str, str]:
    """Captions keyed by POSIX path relative to ``root`` from metadata.jsonl / metadata.csv."""
    rows: list[tuple[str, dict]] = []
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{jsonl}: line {lineno} is not valid JSON ({exc.msg}); expected one object per "
                        'line such as {"file_name": "clip.mp4", "text": "a caption"}.'
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{jsonl}: line {lineno} is {type(row).__name__}, expected a JSON object.")
                rows.append((f"{jsonl.name}:{lineno}", row))
    if csv_path.is_file():
        with open(csv_path, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), 2):
                rows.append((f"{csv_path.name}:{lineno}", row))
    captions: dict[str, str] = {}
    for where, row in rows:
        file_key = next((c for c in FILE_COLUMNS if c in row), None)
        cap_keys = (caption_column,) if caption_column else CAPTION_COLUMNS
        cap_key = next((c for c in cap_keys if c in row), None)
        if file_key is None or cap_key is None:
            raise ValueError(
                f"{where}: expected a file column ({'/'.join(FILE_COLUMNS)}) and a caption column "
                f"({'/'.join(cap_keys)}), got columns {sorted(row)}. Rename the columns or pass --caption-column."
            )
        rel = Path(str(row[file_key])).as_posix()  # pathlib drops a leading "./"
        captions[rel] = str(row[cap_key] if row[cap_key] is not None else "").strip()
    return captions


def _iter_videos(root: Path, exclude: Iterable[Path]) -> Iterator[Path]:
    excluded = [p.resolve() for p in exclude]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                yield here / name


def scan_dataset(
    root: str | os.PathLike, caption_column: str | None = None, exclude: Iterable[Path] = ()
) -> DatasetScan:
    """Find the videos under ``root`` and their captions (see the module docstring for the layout)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"Dataset folder {str(root)!r} does not exist or is not a directory; pass a folder of videos "
            f"({VIDEO_FORMATS}) with captions (same-name .txt or metadata.jsonl)."
        )
    meta = _read_metadata(root, caption_column)
    samples, skipped = [], []
    for path in _iter_videos(root, exclude):
        rel = path.relative_to(root).as_posix()
        caption = meta.get(rel)
        if caption is None:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        if caption is None:
            skipped.append((rel, "no caption (add a same-name .txt or a metadata.jsonl row)"))
        elif not caption:
            skipped.append((rel, "empty caption"))
        else:
            samples.append(VideoSample(path=path, relpath=rel, caption=caption))
    known = {s.relpath for s in samples} | {r for r, _ in skipped}
    for rel in sorted(set(meta) - known):
        skipped.append((rel, "listed in metadata but the file is missing"))
    return DatasetScan(samples=tuple(samples), skipped=tuple(skipped))


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"unexpected frame shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr[..., :3]


def resize_cover_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, h, w] float -> [T, 3, height, width]: scale to cover the target, then center-crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top : top + height, left : left + width]


def read_clip(path: str | os.PathLike, spec: ClipSpec) -> torch.Tensor:
    """The training clip of one video: float32 [3, F, H, W] in [-1, 1].

    Raises ``VideoReadError`` (with the file name) when the file cannot be decoded or has fewer
    than ``spec.source_frames`` frames.
    """
    import imageio.v3 as iio

    path = Path(path)
    wanted = spec.source_frames
    frames: list[torch.Tensor] = []
    count = 0
    try:
        for index, frame in enumerate(iio.imiter(path)):
            count = index + 1
            if index % spec.frame_stride == 0:
                rgb = torch.from_numpy(_to_rgb(frame).copy()).permute(2, 0, 1).float()
                frames.append(resize_cover_crop(rgb[None], spec.height, spec.width)[0])
            if count >= wanted:
                break
    except Exception as exc:  # decoders raise many types (OSError, RuntimeError, ValueError, ...)
        # ffmpeg's errors carry its whole version banner: the first line says what went wrong
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise VideoReadError(path, f"cannot be decoded ({type(exc).__name__}: {first.strip()})") from exc
    if count < wanted:
        stride = f" at frame stride {spec.frame_stride}" if spec.frame_stride > 1 else ""
        raise VideoReadError(
            path,
            f"has {count} frames, needs {wanted} for a {spec.num_frames}-frame clip{stride} "
            "(use a longer video, fewer --num-frames or a smaller --frame-stride)",
        )
    clip = torch.stack(frames, dim=1)  # [3, F, H, W] in [0, 255]
    return clip / 127.5 - 1.0


__all__ = [
    "CAPTION_COLUMNS",
    "VIDEO_EXTENSIONS",
    "VIDEO_FORMATS",
    "ClipSpec",
    "DatasetScan",
    "VideoReadError",
    "VideoSample",
    "read_clip",
    "resize_cover_crop",
    "scan_dataset",
]
