"""The synthetic video world of the trained tiny model: scenes, captions, renderer and a reader.

A scene is one saturated shape (ball, square, triangle) of one colour, doing one motion (moving
left / right / up / down, bouncing, growing) over a grey background (plain, checkered or striped).
Everything is generated in code from a seed, so the training set and the evaluation are
reproducible without any download.

Captions come from a template grammar: ``"a {colour} {shape} {motion}"``, plus
``" on a {background} background"`` for the textured ones (``"a red ball bouncing"``,
``"a blue square moving left on a striped background"``). ``HELD_OUT`` lists (colour, shape,
motion) combinations that training never shows, in any background; every word of them is seen in
other combinations, so a prompt of them tests composition, not vocabulary.

``read_video`` goes the other way: from RGB frames it recovers the object's dominant colour (from
saturated pixels: the backgrounds are grey), its shape (fill ratio of its bounding box) and its
motion (centroid track and area trend). ``check_prompt`` compares that reading with the prompt;
it is the automatic "does the video show what was asked" check of the quality report.
Trajectories are defined over normalised time, so a clip of any length shows the whole motion
(a 33-frame clip is the 17-frame one sampled twice as densely).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.80, 0.22),
    "blue": (0.18, 0.36, 0.96),
    "yellow": (0.95, 0.86, 0.12),
}
SHAPES = ("ball", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "growing")
BACKGROUNDS = ("plain", "checkered", "striped")

#: (colour, shape, motion) combinations never shown in training (in any background).
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "moving left"),
    ("green", "triangle", "bouncing"),
    ("blue", "ball", "growing"),
    ("yellow", "square", "moving up"),
    ("red", "triangle", "moving down"),
    ("blue", "square", "moving right"),
    ("green", "ball", "moving up"),
    ("yellow", "triangle", "growing"),
)

#: Size of the trained model's videos: 17 frames (5 latent frames) of 64x96 (8x12 latent, 4x6 tokens).
TRAIN_FRAMES = 17
HEIGHT = 64
WIDTH = 96


@dataclass(frozen=True)
class Scene:
    """One clip of the world. ``jitter`` in [0, 1)^4 varies start position, size and texture phase."""

    colour: str
    shape: str
    motion: str
    background: str = "plain"
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.5)
    bg_level: float = 0.5

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.colour, tuple(COLOURS), "colour"),
            (self.shape, SHAPES, "shape"),
            (self.motion, MOTIONS, "motion"),
            (self.background, BACKGROUNDS, "background"),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {what} {value!r}; expected one of {', '.join(allowed)}.")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.motion, self.background)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.motion) in HELD_OUT


def caption(colour: str, shape: str, motion: str, background: str = "plain") -> str:
    """The template caption of a scene ("a red ball bouncing on a striped background")."""
    text = f"a {colour} {shape} {motion}"
    return text if background == "plain" else f"{text} on a {background} background"


def vocabulary() -> tuple[str, ...]:
    """Every word the caption grammar can produce, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = []
    for phrase in ("a", *COLOURS, *SHAPES, *MOTIONS, "on", *BACKGROUNDS, "background"):
        for w in phrase.split():
            if w not in words:
                words.append(w)
    return tuple(words)


def parse_caption(text: str) -> tuple[str, str, str, str]:
    """(colour, shape, motion, background) named by ``text``; raises if any is missing.

    Word order is free ("a ball that is red, bouncing" works); the first colour / shape / motion /
    background word found wins.
    """
    low = " ".join(text.lower().replace(",", " ").split())
    found = {}
    for what, options in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("motion", MOTIONS)):
        hits = sorted((low.find(o), o) for o in options if o in low)
        if not hits:
            raise ValueError(f"The prompt {text!r} names no {what} of the synthetic world ({', '.join(options)}).")
        found[what] = hits[0][1]
    bg = next((b for b in BACKGROUNDS[1:] if b in low), "plain")
    return found["colour"], found["shape"], found["motion"], bg


def prompt_note(text: str) -> str | None:
    """What the trained tiny model cannot follow in ``text``, as one sentence, or None when it names
    a colour, a shape and a motion of the synthetic world in its words. Its tokenizer maps any other
    word to one unknown token, so "a purple elephant flying" asks for nothing it knows."""
    known = set(vocabulary())
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()  # as the tokenizer splits
    unknown = [w for w in dict.fromkeys(words) if w not in known]
    try:
        parse_caption(text)
        missing = None
    except ValueError as exc:
        missing = str(exc).split(" names ", 1)[1].rstrip(".")
    if not unknown and missing is None:
        return None
    parts = []
    if unknown:
        parts.append(f"it does not know {', '.join(repr(w) for w in unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    if missing is not None:
        parts.append(f"it names {missing}")
    return (
        f"the tiny model draws only its synthetic world, and of --prompt {text!r} " + "; ".join(parts) + ". "
        f"Try e.g. {caption('blue', 'ball', 'bouncing')!r} (docs/tiny_model.md lists every word)."
    )


def combinations(held_out: bool | None = False) -> list[tuple[str, str, str]]:
    """(colour, shape, motion) triples: the trained ones (``False``), the held-out ones (``True``) or all."""
    triples = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    if held_out is None:
        return triples
    return [t for t in triples if (t in HELD_OUT) == held_out]


def training_scenes(variants: int, seed: int = 0) -> list[Scene]:
    """The training set: every trained triple in every background, ``variants`` jittered copies each."""
    rng = random.Random(seed)
    out = []
    for colour, shape, motion in combinations(held_out=False):
        for bg in BACKGROUNDS:
            for _ in range(variants):
                jitter = (rng.random(), rng.random(), rng.random(), rng.random())
                out.append(Scene(colour, shape, motion, bg, jitter, rng.random()))
    return out


# -- rendering --------------------------------------------------------------------------------


def _background(scene: Scene, height: int, width: int) -> np.ndarray:
    """Grey background [H, W] in [0, 1]: plain, 12-pixel checkers or 8-pixel horizontal stripes."""
    dark = 0.08 + 0.14 * scene.bg_level
    if scene.background == "plain":
        return np.full((height, width), dark, np.float32)
    light = dark + 0.22
    phase = int(scene.jitter[3] * 12)
    yy, xx = np.mgrid[0:height, 0:width]
    if scene.background == "checkered":
        on = (((yy + phase) // 12) + ((xx + phase) // 12)) % 2 == 1
    else:
        on = ((yy + phase) // 8) % 2 == 1
    return np.where(on, light, dark).astype(np.float32)


def _trajectory(scene: Scene, t: float, height: int, width: int) -> tuple[float, float, float]:
    """(centre x, centre y, radius) in pixels at normalised time ``t`` in [0, 1]."""
    jx, jy, js, _ = scene.jitter
    r = min(height, width) * (0.12 + 0.05 * js)
    cx = width * (0.35 + 0.3 * jx)
    cy = height * (0.35 + 0.3 * jy)
    span_x, span_y = 0.55 * width, 0.45 * height
    m = scene.motion
    if m == "moving left":
        cx = width / 2 + span_x * (0.5 - t)
    elif m == "moving right":
        cx = width / 2 + span_x * (t - 0.5)
    elif m == "moving up":
        cy = height / 2 + span_y * (0.5 - t)
    elif m == "moving down":
        cy = height / 2 + span_y * (t - 0.5)
    elif m == "bouncing":  # two bounces on a floor: top at t = 0, 1/2, 1; floor at 1/4, 3/4
        floor, top = height - r - 1, r + 3
        cy = floor - (floor - top) * abs(math.cos(2 * math.pi * t))
    elif m == "growing":
        r = r * (0.55 + 1.0 * t)
    return cx, cy, r


def _coverage(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Anti-aliased [H, W] coverage in [0, 1] (signed distance with a one-pixel ramp) on pixel centres."""
    dx, dy = xx - cx, yy - cy
    if shape == "ball":
        d = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        h = 0.88 * r
        d = np.maximum(np.abs(dx), np.abs(dy)) - h
    else:  # upward triangle inscribed in the circle of radius 1.1 r
        R = 1.1 * r
        d = np.full_like(dx, -np.inf)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3  # outward normal of each edge (y points down)
            nx, ny = math.cos(a), math.sin(a)
            d = np.maximum(d, dx * nx + dy * ny - R / 2)
    return np.clip(0.5 - d, 0.0, 1.0)


def render(scene: Scene, frames: int = TRAIN_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """The clip of ``scene`` as float32 RGB [frames, H, W, 3] in [0, 1]."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}.")
    bg = _background(scene, height, width)[..., None].repeat(3, axis=-1)
    colour = np.asarray(COLOURS[scene.colour], np.float32)
    out = np.empty((frames, height, width, 3), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 0.0
        cov = _coverage(scene.shape, *_trajectory(scene, t, height, width), yy, xx)[..., None]
        out[i] = bg * (1 - cov) + colour * cov
    return out


# -- reading a video back ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What ``read_video`` saw: colour / shape / motion (``None`` when no object was found)."""

    colour: str | None
    shape: str | None
    motion: str | None
    visible_frames: int
    track: tuple[tuple[float, float, float], ...]  # (x / W, y / H, area / (H W)) per visible frame

    def as_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "motion": self.motion,
            "visible_frames": self.visible_frames,
        }


def _as_float_frames(frames) -> np.ndarray:
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"Expected RGB frames [F, H, W, 3], got shape {video.shape}.")
    video = video.astype(np.float32)
    return video / 255.0 if video.max() > 1.5 else video


def read_video(frames, saturation: float = 0.3, min_area: float = 0.004) -> Reading:
    """Recover the object's colour, shape and motion from RGB frames [F, H, W, 3] (uint8 or [0, 1]).

    The object is the set of saturated pixels (max - min channel > ``saturation``); frames where it
    covers less than ``min_area`` of the picture count as not showing it.
    """
    video = _as_float_frames(frames)
    f, h, w, _ = video.shape
    sat = video.max(-1) - video.min(-1)
    mask = sat > saturation
    yy, xx = np.mgrid[0:h, 0:w]
    track, fills, pixels = [], [], []
    for i in range(f):
        m = mask[i]
        area = int(m.sum())
        if area < min_area * h * w:
            continue
        ys, xs = yy[m], xx[m]
        track.append((float(xs.mean()) / w, float(ys.mean()) / h, area / (h * w)))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(area / box)
        pixels.append(video[i][m])
    if len(track) < max(2, f // 2):
        return Reading(None, None, None, len(track), tuple(track))
    mean_rgb = np.concatenate(pixels).mean(0)
    colour = min(COLOURS, key=lambda c: _hue_distance(mean_rgb, np.asarray(COLOURS[c])))
    fill = float(np.median(fills))
    shape = "square" if fill > 0.9 else "ball" if fill > 0.66 else "triangle"
    return Reading(colour, shape, _motion(track), len(track), tuple(track))


def _hue(rgb: np.ndarray) -> float:
    r, g, b = (float(v) for v in rgb)
    return math.degrees(math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def _hue_distance(a: np.ndarray, b: np.ndarray) -> float:
    d = abs(_hue(a) - _hue(b))
    return min(d, 360 - d)


def _motion(track: list[tuple[float, float, float]]) -> str:
    xs = np.array([p[0] for p in track])
    ys = np.array([p[1] for p in track])
    areas = np.array([p[2] for p in track])
    k = max(1, len(track) // 6)
    first, last = slice(0, k), slice(-k, None)
    if areas[last].mean() / max(areas[first].mean(), 1e-9) > 1.8:
        return "growing"
    dx = xs[last].mean() - xs[first].mean()
    dy = ys[last].mean() - ys[first].mean()
    y_range = ys.max() - ys.min()
    if y_range > 0.2 and abs(dy) < 0.5 * y_range and abs(dx) < 0.15:
        return "bouncing"  # went down and came back up
    if max(abs(dx), abs(dy)) < 0.15:
        return "still"
    if abs(dx) >= abs(dy):
        return "moving left" if dx < 0 else "moving right"
    return "moving up" if dy < 0 else "moving down"


@dataclass(frozen=True)
class PromptCheck:
    """``check_prompt``'s verdict: what was asked, what was read, and which parts match."""

    prompt: str
    asked: tuple[str, str, str]
    reading: Reading

    @property
    def colour_ok(self) -> bool:
        return self.reading.colour == self.asked[0]

    @property
    def shape_ok(self) -> bool:
        return self.reading.shape == self.asked[1]

    @property
    def motion_ok(self) -> bool:
        return self.reading.motion == self.asked[2]

    @property
    def passed(self) -> bool:
        """Colour and motion both right (shape is reported, not required: it is the hardest to read)."""
        return self.colour_ok and self.motion_ok

    def as_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "asked": dict(zip(("colour", "shape", "motion"), self.asked)),
            "read": self.reading.as_dict(),
            "colour_ok": self.colour_ok,
            "shape_ok": self.shape_ok,
            "motion_ok": self.motion_ok,
            "passed": self.passed,
        }


def check_prompt(frames, prompt: str) -> PromptCheck:
    """Does the video show the colour / shape / motion ``prompt`` asks for?"""
    colour, shape, motion, _ = parse_caption(prompt)
    return PromptCheck(prompt, (colour, shape, motion), read_video(frames))


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HEIGHT",
    "HELD_OUT",
    "MOTIONS",
    "SHAPES",
    "TRAIN_FRAMES",
    "WIDTH",
    "PromptCheck",
    "Reading",
    "Scene",
    "caption",
    "check_prompt",
    "combinations",
    "parse_caption",
    "read_video",
    "render",
    "training_scenes",
    "vocabulary",
]
