"""Video writing: formats, frame conversion, and atomicity (no partial file, old file untouched)."""

import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from vidsparse import video_io
from vidsparse.video_io import as_uint8_frames, check_video_path, psnr, write_video


def _smooth_video(t=5, h=32, w=48) -> np.ndarray:
    """A smooth moving gradient (compresses well, so mp4 round trips closely)."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [
        np.stack([(x + 4 * i) % w / w, y / h, np.full_like(x, i / max(1, t - 1), dtype=float)], axis=-1)
        for i in range(t)
    ]
    return np.stack(frames).astype(np.float32)


def test_mp4_round_trip(tmp_path):
    video = _smooth_video()
    out = write_video(tmp_path / "sub" / "v.mp4", video, fps=8)
    assert out == tmp_path / "sub" / "v.mp4" and out.is_file()
    back = np.stack(imageio.mimread(out))
    assert back.shape == (5, 32, 48, 3)
    assert np.abs(back.astype(float) - as_uint8_frames(video).astype(float)).mean() < 8.0
    assert os.listdir(out.parent) == ["v.mp4"]  # no temporary left behind


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    out = write_video(tmp_path / "odd.mp4", np.zeros((3, 33, 47, 3), dtype=np.uint8), fps=4)
    back = np.stack(imageio.mimread(out))
    assert back.shape == (3, 34, 48, 3)


def test_gif_round_trip(tmp_path):
    video = np.zeros((4, 8, 10, 3), np.uint8)
    for i in range(4):
        video[i, :, i::4] = 255  # distinct frames (Pillow merges identical ones), two colours
    out = write_video(tmp_path / "v.gif", video, fps=10)
    back = np.stack([np.asarray(f.convert("RGB")) for f in _gif_frames(out)])
    assert back.shape == (4, 8, 10, 3)
    assert np.array_equal(back, video)  # two colours: exact through the palette


def _gif_frames(path):
    img = Image.open(path)
    frames = []
    for i in range(img.n_frames):
        img.seek(i)
        frames.append(img.copy())
    return frames


def test_as_uint8_frames_conversions():
    f = np.array([[[[0.0, 0.5, 1.0]]]], dtype=np.float32)  # [1, 1, 1, 3]
    assert as_uint8_frames(f).tolist() == [[[[0, 128, 255]]]]
    assert as_uint8_frames(f[None]).shape == (1, 1, 1, 3)  # batch of one
    assert as_uint8_frames(np.full((2, 3, 4), 7, dtype=np.uint8)).shape == (2, 3, 4, 3)  # grayscale
    assert as_uint8_frames(torch.ones(2, 3, 4, 3)).max() == 255
    pil = [Image.new("RGB", (4, 3), (10, 20, 30)) for _ in range(2)]
    assert as_uint8_frames(pil)[1, 2, 3].tolist() == [10, 20, 30]
    assert as_uint8_frames(np.zeros((2, 3, 4, 4), dtype=np.uint8)).shape == (2, 3, 4, 3)  # alpha dropped
    with pytest.raises(ValueError, match="NaN"):
        as_uint8_frames(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        as_uint8_frames(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="no frames"):
        as_uint8_frames([])


def test_check_video_path_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        check_video_path(tmp_path / "v.avi")
    with pytest.raises(ValueError, match="directory"):
        check_video_path(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_video_path(tmp_path / "file" / "v.mp4")
    assert check_video_path(tmp_path / "new" / "v.GIF").suffix == ".GIF"


def test_write_rejects_bad_fps(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "v.mp4", np.zeros((1, 2, 2, 3), np.uint8), fps=0)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch, error, suffix):
    dest = tmp_path / f"v{suffix}"
    dest.write_bytes(b"the previous video")

    def broken(tmp, video, fps, *args):
        with open(tmp, "wb") as fh:
            fh.write(b"half a video")
        raise error

    monkeypatch.setattr(video_io, "_write_mp4" if suffix == ".mp4" else "_write_gif", broken)
    with pytest.raises(type(error)):
        write_video(dest, np.zeros((2, 4, 4, 3), np.uint8))
    assert dest.read_bytes() == b"the previous video"
    assert sorted(os.listdir(tmp_path)) == [dest.name]


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[...] = 1  # MSE 1 -> 20 log10(255)
    assert psnr(a, b) == pytest.approx(20 * np.log10(255.0))
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


def _fake_ffmpeg(tmp_path, monkeypatch, stderr: str, code: int):
    """An ffmpeg that reads its stdin, writes half a file to its output and exits with ``code``."""
    import imageio_ffmpeg

    exe = tmp_path / "fake-ffmpeg"
    exe.write_text(
        f'#!/bin/sh\ncat > /dev/null\nfor last; do :; done\nprintf half > "$last"\necho "{stderr}" >&2\nexit {code}\n'
    )
    exe.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(exe))


def test_mp4_write_that_ffmpeg_fails_raises_and_keeps_the_old_file(tmp_path, monkeypatch):
    # imageio's writer ignored ffmpeg's exit status: on a full disk a truncated file took the output's place.
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "v.mp4"
    dest.write_bytes(b"the previous video")
    _fake_ffmpeg(tmp_path, monkeypatch, "[out#0/mp4 @ 0x5] Error closing file: No space left on device", 1)
    with pytest.raises(OSError) as info:
        write_video(dest, np.zeros((2, 4, 4, 3), np.uint8))
    import errno

    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dest)
    assert info.value.strerror == "ffmpeg: Error closing file: No space left on device"
    assert dest.read_bytes() == b"the previous video" and sorted(os.listdir(out)) == ["v.mp4"]

    _fake_ffmpeg(tmp_path, monkeypatch, "Unknown encoder 'libx264'", 8)
    with pytest.raises(OSError, match=r"ffmpeg could not write the video \(Unknown encoder 'libx264'\)"):
        write_video(dest, np.zeros((2, 4, 4, 3), np.uint8))
    assert dest.read_bytes() == b"the previous video" and sorted(os.listdir(out)) == ["v.mp4"]


def test_mp4_keeps_a_fractional_frame_rate(tmp_path):
    out = write_video(tmp_path / "v.mp4", _smooth_video(t=3), fps=12.5)
    assert imageio.get_reader(out).get_meta_data()["fps"] == pytest.approx(12.5)


def test_atomic_write_on_a_full_disk_says_so(tmp_path, monkeypatch):
    # torch.save reports a full disk as "RuntimeError: ... unexpected pos"; the atomic writer names it.
    import errno

    from vidsparse import atomic

    monkeypatch.setattr(atomic, "_disk_full", lambda directory: True)
    dest = tmp_path / "state.pt"
    with pytest.raises(OSError) as info, atomic.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dest)
    assert "unexpected pos 128 vs 0" in info.value.strerror
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(atomic, "_disk_full", lambda directory: False)  # any other error passes unchanged
    with pytest.raises(RuntimeError, match="a bug"), atomic.atomic_path(dest) as tmp:
        raise RuntimeError("a bug")
