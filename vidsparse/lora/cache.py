"""Latent and text-embedding cache: encode each video and caption once, reuse across runs.

Layout of a cache folder::

    cache/
      manifest.json              what each entry is (video, clip settings, encoder identities)
      latents/<key>.safetensors  normalized VAE latents [C, f, h, w] (image-to-video: and the
                                 clip's conditioning, e.g. first-frame latents, image embeddings)
      text/<key>.safetensors     text conditioning of one caption

Keys are content addresses, so a changed setting invalidates only what it affects:

- a latent key hashes the video (relative path, size, mtime and its first/last 64 KiB), the clip
  settings (frames, stride, height, width) and the VAE identity;
- a text key hashes the caption and the text-encoder identity.

Changing ``--num-frames`` therefore re-encodes latents but reuses every text embedding. Every
file is written atomically (temp file + ``os.replace``), so an interrupted or failing run never
damages what is already cached; a video that fails to decode is reported by name and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidsparse.atomic import write_json
from vidsparse.lora.adapters.base import TrainableVideoModel
from vidsparse.lora.atomic import save_tensors
from vidsparse.lora.data import ClipSpec, VideoReadError, VideoSample, read_clip

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_EDGE_BYTES = 64 * 1024


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def video_identity(path: Path) -> dict:
    """Size, mtime and a hash of the first and last 64 KiB: changes whenever the file does."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_EDGE_BYTES))
        if st.st_size > 2 * _EDGE_BYTES:
            fh.seek(-_EDGE_BYTES, os.SEEK_END)
            h.update(fh.read(_EDGE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()[:16]}


def latent_key(sample: VideoSample, spec: ClipSpec, vae_id: str, text_id: str | None = None) -> tuple[str, dict]:
    """The key of a clip's latent file; ``text_id`` (a condition that reads the caption) adds the caption
    and the text encoders' identity to it."""
    info = {
        "video": sample.relpath,
        **video_identity(sample.path),
        "num_frames": spec.num_frames,
        "frame_stride": spec.frame_stride,
        "height": spec.height,
        "width": spec.width,
        "vae": vae_id,
    }
    if text_id is not None:
        info.update(caption=sample.caption, text_encoder=text_id)
    return _digest(info), info


def text_key(caption: str, text_id: str) -> tuple[str, dict]:
    info = {"caption": caption, "text_encoder": text_id}
    return _digest(info), info


@dataclass(frozen=True)
class CachedSample:
    """A usable training sample: where its latents and text conditioning live."""

    relpath: str
    caption: str
    latent_file: Path
    text_file: Path


@dataclass
class CacheReport:
    """What ``prepare`` did: usable samples, skipped videos with reasons, and work counts."""

    samples: list[CachedSample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    latents_computed: int = 0
    latents_reused: int = 0
    text_computed: int = 0
    text_reused: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.samples)} usable videos, {len(self.skipped)} skipped; latents: "
            f"{self.latents_computed} encoded, {self.latents_reused} reused; text: "
            f"{self.text_computed} encoded, {self.text_reused} reused"
        )


class LatentCache:
    """A cache folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.manifest_path = self.root / "manifest.json"

    def latent_path(self, key: str) -> Path:
        return self.root / "latents" / f"{key}.safetensors"

    def text_path(self, key: str) -> Path:
        return self.root / "text" / f"{key}.safetensors"

    def read_manifest(self) -> dict:
        empty = {"version": MANIFEST_VERSION, "latents": {}, "text": {}}
        if not self.manifest_path.is_file():
            return empty
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("vidsparse: cache manifest %s unreadable (%s); rebuilding it.", self.manifest_path, exc)
            return empty
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return empty
        data.setdefault("latents", {})
        data.setdefault("text", {})
        return data

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"Cannot create the cache folder {str(self.root)!r} ({exc}); pass --cache-dir.") from exc
        if not os.access(self.root, os.W_OK):
            raise ValueError(f"The cache folder {str(self.root)!r} is not writable; pass a writable --cache-dir.")

    def prepare(
        self,
        samples: Sequence[VideoSample],
        spec: ClipSpec,
        model: TrainableVideoModel,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        progress: bool = True,
    ) -> CacheReport:
        """Encode what is missing (this rank's share when distributed) and list the usable samples.

        Rank ``r`` encodes the missing entries among samples ``i % world_size == r`` (its counts
        in the report cover that share); after ``barrier`` every rank sees the same files, and
        rank 0 writes the manifest.
        """
        from tqdm.auto import tqdm

        self._check_writable()
        report = CacheReport()
        manifest = self.read_manifest()
        vae_id, text_id = model.vae_identity(), model.text_identity()
        plan: list[tuple[VideoSample, str, dict, str, dict]] = []
        for s in samples:
            try:
                lk, linfo = latent_key(s, spec, vae_id, text_id if model.condition_reads_caption else None)
            except OSError as exc:
                report.skipped.append((s.relpath, f"cannot be read ({exc})"))
                continue
            tk, tinfo = text_key(s.caption, text_id)
            plan.append((s, lk, linfo, tk, tinfo))

        # Shares depend only on the sample list, never on which files exist yet: another rank
        # may already be writing its share while this one looks.
        texts = list({p[3]: p for p in plan}.values())
        share_lat = [p for i, p in enumerate(plan) if i % world_size == rank]
        share_txt = [p for i, p in enumerate(texts) if i % world_size == rank]
        mine_lat = [p for p in share_lat if not self.latent_path(p[1]).is_file()]
        mine_txt = [p for p in share_txt if not self.text_path(p[3]).is_file()]
        report.latents_reused = len(share_lat) - len(mine_lat)
        report.text_reused = len(share_txt) - len(mine_txt)
        failed: dict[str, str] = {}
        bar = tqdm(
            total=len(mine_lat) + len(mine_txt),
            desc="caching latents/text",
            unit="item",
            disable=not progress or not (mine_lat or mine_txt),
        )
        with bar:
            for s, lk, linfo, _, _ in mine_lat:
                bar.set_postfix_str(s.relpath[-40:], refresh=False)
                try:
                    clip = read_clip(s.path, spec)
                except VideoReadError as exc:
                    failed[s.relpath] = exc.reason  # reported once, by the caller, with the scan's skips
                    bar.update(1)
                    continue
                captions = {"captions": [s.caption]} if model.condition_reads_caption else {}
                encoded = {k: v[0].float() for k, v in model.encode_clip(clip[None], **captions).items()}
                save_tensors(self.latent_path(lk), encoded, metadata={k: str(v) for k, v in linfo.items()})
                report.latents_computed += 1
                bar.update(1)
            # A caption only the videos that just failed to read use is not worth encoding (another
            # rank's videos, not read here, may still use it).
            wanted = {p[3] for p in plan if p[0].relpath not in failed}
            for _, _, _, tk, tinfo in mine_txt:
                if tk not in wanted:
                    bar.update(1)
                    continue
                cond = model.encode_text(tinfo["caption"])
                save_tensors(self.text_path(tk), cond, metadata={"text_encoder": text_id})
                report.text_computed += 1
                bar.update(1)
        if barrier is not None:
            barrier()
        for s, lk, linfo, tk, tinfo in plan:
            lp, tp = self.latent_path(lk), self.text_path(tk)
            if lp.is_file() and tp.is_file():
                manifest["latents"][lk] = linfo
                manifest["text"][tk] = tinfo
                report.samples.append(CachedSample(s.relpath, s.caption, lp, tp))
            elif s.relpath in failed:
                report.skipped.append((s.relpath, failed[s.relpath]))
            elif not lp.is_file():
                report.skipped.append((s.relpath, "could not be encoded (see the warnings of the other processes)"))
        if rank == 0:
            write_json(self.manifest_path, manifest)
        return report


def load_latents(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latents"]


def load_clip_conditioning(path: Path) -> dict[str, torch.Tensor]:
    """What a latent file holds besides ``"latents"``: the clip's own conditioning (image-to-video)."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k != "latents"}


def load_text(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = [
    "CacheReport",
    "CachedSample",
    "LatentCache",
    "latent_key",
    "load_clip_conditioning",
    "load_latents",
    "load_text",
    "text_key",
    "video_identity",
]
