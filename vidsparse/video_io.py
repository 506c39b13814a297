"""Video files: atomic writing of generated frames (mp4 via ffmpeg, gif via Pillow).

A generated video is the product of minutes of GPU time, and an output path is often a
file the user already has. So a video is written through :func:`vidsparse.atomic.atomic_path`:
a temporary file in the destination directory,
fsynced, then moved over the destination with ``os.replace``. If anything fails or the user
presses Ctrl-C, the temporary file is removed and an existing file is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vidsparse.atomic import atomic_path

VIDEO_SUFFIXES = (".mp4", ".gif")


def as_uint8_frames(video) -> np.ndarray:
    """Frames as uint8 [T, H, W, 3] from what pipelines return.

    Accepts a numpy array or torch tensor [T, H, W, C] (uint8, or float in [0, 1] as
    diffusers' ``output_type="np"`` gives), a leading batch dimension of 1, one or three
    channels, or a list of PIL images.
    """
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("The video has no frames; expected at least one frame.")
        video = np.stack([np.asarray(frame) for frame in video])
    if hasattr(video, "detach"):  # torch tensor, without importing torch here
        video = video.detach().float().cpu().numpy() if video.is_floating_point() else video.cpu().numpy()
    arr = np.asarray(video)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:  # [T, H, W] grayscale
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Expected video frames shaped [T, H, W, C] with C in (1, 3, 4), got shape {arr.shape}. "
            "Pass one video (not a batch) in channels-last layout."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"The video is empty (shape {arr.shape}); expected at least one 1x1 frame.")
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("The video contains NaN or inf values; the generation diverged (try --dtype float32).")
        out = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"Video frames must be uint8, integer or float in [0, 1], got dtype {arr.dtype}.")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)


def video_fps(path: str | os.PathLike) -> float | None:
    """The frame rate a video file declares (None when it declares none, as a GIF may not)."""
    import imageio.v3 as iio

    try:
        fps = iio.immeta(Path(path).expanduser()).get("fps")
    except Exception:  # unreadable metadata: the caller falls back to its default
        return None
    return float(fps) if isinstance(fps, (int, float)) and fps > 0 else None


def read_frames(path: str | os.PathLike, max_frames: int | None = None) -> list:
    """The first ``max_frames`` (all if None) frames of a video file as RGB PIL images (a pipeline's video input).

    A ValueError names the file when it cannot be decoded or holds no frame.
    """
    import imageio.v3 as iio
    from PIL import Image

    p = Path(path).expanduser()
    frames = []
    try:
        for frame in iio.imiter(p):
            frames.append(Image.fromarray(as_uint8_frames(np.asarray(frame)[None])[0]))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as exc:  # decoders raise many types (OSError, RuntimeError, ValueError, ...)
        raise ValueError(f"Video {str(path)!r} cannot be read ({type(exc).__name__}: {exc}).") from None
    if not frames:
        raise ValueError(f"Video {str(path)!r} holds no frame.")
    return frames


def check_output_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Validate a file the command will write, before any work: a known suffix (when ``suffixes``),
    not a directory, in a directory where files can be created (made later if missing).

    ``what`` names it in messages (a flag such as ``"--json"``). Nothing is created.
    """
    p = Path(path).expanduser()
    if p.is_dir() or str(path).endswith(("/", os.sep)):  # a trailing slash names a folder, existing or not
        example = f", such as {str(p / ('output' + (suffixes[0] if suffixes else '.json')))!r}"
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file name inside it{example}.")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(
            f"{what} {str(p)!r}: unsupported file type {p.suffix or '(none)'!r}; expected a path ending in "
            f"{' or '.join(suffixes)}."
        )
    check_writable_dir(p.parent, f"{what} {str(p)!r}")  # also refuses a parent (or ancestor) that is a file
    return p


def check_video_path(path: str | os.PathLike) -> Path:
    """Validate a video output path before any heavy work (``check_output_file`` for .mp4 / .gif)."""
    return check_output_file(path, "output path", VIDEO_SUFFIXES)


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Raise ValueError unless files can be created in ``directory`` (or, when it does not exist
    yet, in its nearest existing ancestor, where it will be created).

    Tried for real with a temporary file, since permission bits do not tell: root passes
    ``os.access`` on a read-only filesystem or in /proc, and the write would fail only after the work.
    """
    d = Path(directory).expanduser().absolute()
    existing = d
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Cannot write {what}: {str(existing)!r} is a file, not a directory; choose another path.")
    try:
        fd, name = tempfile.mkstemp(prefix=".vidsparse-write-check-", dir=existing)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = str(existing) if existing == d else f"{existing} (where {d} would be created)"
        raise ValueError(
            f"Cannot write {what}: files cannot be created in {where}: {exc.strerror or exc}. "
            "Choose an output path in a writable directory."
        ) from None


def write_video(path: str | os.PathLike, frames, fps: int = 16, quality: int = 8) -> Path:
    """Write frames ([T, H, W, 3] uint8 or float in [0, 1]) to ``path`` (.mp4 or .gif), atomically.

    The parent directory is created if needed. Returns the final path. mp4 uses H.264 (yuv420p,
    so odd heights/widths are padded by one replicated row/column); gif loops forever (Pillow
    merges consecutive identical frames into one longer frame).
    """
    p = check_video_path(path)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}.")
    video = as_uint8_frames(frames)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".gif":
            _write_gif(tmp, video, fps)
        else:
            _write_mp4(tmp, video, fps, quality)
    return p


def _even(video: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by replicating the last row/column (H.264 yuv420p needs it)."""
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return video


def _write_mp4(tmp: Path, video: np.ndarray, fps: float, quality: int) -> None:
    """H.264 through the ffmpeg that imageio-ffmpeg ships, fed raw RGB frames on stdin.

    Run here rather than through imageio's writer, which ignores ffmpeg's exit status: on a full
    disk it left a truncated file that was then moved over the output as if it were complete.
    Here a failed encode raises (OSError naming the reason) and ``atomic_path`` removes the file.
    """
    import subprocess
    from fractions import Fraction

    import imageio_ffmpeg

    video = _even(video)
    t, h, w, _ = video.shape
    crf = int((1 - quality / 10.0) * 51)  # imageio's quality scale (0-10, 10 best) as x264's CRF
    rate = Fraction(fps).limit_denominator()
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24", "-r", str(rate),
        "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), str(tmp),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: ffmpeg never blocks on its stderr
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            try:
                for frame in video:
                    proc.stdin.write(frame.tobytes())
            except BrokenPipeError:  # ffmpeg stopped early: its exit status and stderr say why
                pass
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            code = proc.wait()
        except BaseException:  # Ctrl-C or an error here: do not leave ffmpeg running
            proc.kill()
            proc.wait()
            raise
        if code != 0:
            err.seek(0)
            reason = err.read().decode(errors="replace").strip().splitlines()
            # the last line, without ffmpeg's "[out#0/mp4 @ 0x...]" source tag
            detail = re.sub(r"^\[[^\]]*\]\s*", "", reason[-1]) if reason else f"exit status {code}"
            if "No space left" in detail or "Disk quota" in detail:
                raise OSError(errno.ENOSPC, f"ffmpeg: {detail}")
            raise OSError(f"ffmpeg could not write the video ({detail}).")


def _write_gif(tmp: Path, video: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in video]
    duration_ms = max(20, int(round(1000.0 / fps)))  # browsers clamp below 20 ms
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration_ms,
        loop=0,
        optimize=False,
    )


def psnr(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 videos of the same shape (inf if equal)."""
    x, y = as_uint8_frames(a).astype(np.float64), as_uint8_frames(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs two videos of the same shape, got {x.shape} and {y.shape}.")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(255.0**2 / mse))


def ssim(a: np.ndarray | Sequence, b: np.ndarray | Sequence, window: int = 7) -> float:
    """Mean structural similarity of two uint8 videos of the same shape, frame by frame on each
    RGB channel (uniform ``window`` x ``window`` means, the constants of Wang et al. 2004), in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    x, y = as_uint8_frames(a), as_uint8_frames(b)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs two videos of the same shape, got {x.shape} and {y.shape}.")
    tx = torch.from_numpy(x).double().permute(0, 3, 1, 2).reshape(-1, 1, *x.shape[1:3])
    ty = torch.from_numpy(y).double().permute(0, 3, 1, 2).reshape(-1, 1, *y.shape[1:3])
    k = min(window, *x.shape[1:3])

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, k, stride=1)

    mx, my = mean(tx), mean(ty)
    vx, vy, cxy = mean(tx * tx) - mx * mx, mean(ty * ty) - my * my, mean(tx * ty) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


__all__ = [
    "VIDEO_SUFFIXES",
    "as_uint8_frames",
    "check_output_file",
    "check_video_path",
    "check_writable_dir",
    "psnr",
    "read_frames",
    "ssim",
    "write_video",
]
