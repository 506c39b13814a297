"""Command-line flags of ``vidsparse generate --freeswim`` and their translation into options.

The command owns ``--height``/``--width`` (the target), ``--frames``, ``--steps``, ``--guidance``,
``--seed``, ``--backend`` and ``--block-size``; ``freeswim_settings_from_args`` gives the other
``FreeSwimOptions`` fields (what ``GenerateOptions.freeswim`` holds), and
``freeswim_options_from_args`` takes the command's values from the caller, so this module does
not depend on the command's attribute names. Bad values raise ValueError with the flag's name
(the command turns it into its one-line user error).
This module imports no CLI module.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the options module imports torch; --help must not
    from vidsparse.freeswim.two_stage import FreeSwimOptions

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def add_freeswim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the FreeSwim group: --freeswim, --base-size, --strength, --cache-interval, ..."""
    g = parser.add_argument_group(
        "FreeSwim (training-free high resolution, Wan)",
        "Generate at the model's native size, then refine at --height x --width with FreeSwim's inward window "
        "and dual path (docs/freeswim.md).",
    )
    g.add_argument("--freeswim", action="store_true", help="two-stage FreeSwim generation at --height x --width")
    g.add_argument(
        "--base-size",
        default=None,
        metavar="HxW",
        help="stage-1 size in pixels, e.g. 480x832 (default: the model's native size)",
    )
    g.add_argument("--strength", type=float, default=0.7, help="stage-2 noise strength (default 0.7: 35 of 50 steps)")
    g.add_argument(
        "--cache-interval",
        type=int,
        default=2,
        help="full branch every N conditional steps, cached cross-attention in between; 1 = no cache (default 2)",
    )
    g.add_argument("--flow-shift", type=float, default=9.0, help="stage-2 scheduler shift (default 9.0)")
    g.add_argument(
        "--freeswim-scale",
        default="freeswim",
        metavar="freeswim|default|FLOAT",
        help="self-attention softmax scale: freeswim, the reference's entropy factor (the default); 'default', the "
        "model's own 1/sqrt(d); or FLOAT x 1/sqrt(d)",
    )
    g.add_argument(
        "--cache-budget",
        default=None,
        metavar="SIZE",
        help="device memory for the cross-attention cache, e.g. 8GB (default: half the free GPU memory)",
    )
    g.add_argument(
        "--cache-overflow",
        choices=("cpu", "recompute"),
        default="cpu",
        help="beyond the budget: keep blocks in host memory (cpu, default) or run the full branch every step",
    )


def parse_size(text: str, flag: str = "--base-size") -> tuple[int, int]:
    """``"480x832"`` (height x width, pixels) -> (480, 832)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"{flag} expects HEIGHTxWIDTH in pixels like 480x832, got {text!r}.")
    return int(m.group(1)), int(m.group(2))


def parse_bytes(text: str, flag: str = "--cache-budget") -> int:
    """``"8GB"``, ``"512MiB"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{flag} expects a size like 8GB, 512MiB or a number of bytes, got {text!r}.")
    return int(float(m.group(1)) * _UNITS[unit])


def _scale(text: str) -> str | float:
    if text in ("freeswim", "default"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--freeswim-scale expects 'freeswim', 'default' or a number > 0, got {text!r}.") from None
    if not value > 0:
        raise ValueError(f"--freeswim-scale expects a number > 0, got {text!r}.")
    return value


def freeswim_settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed FreeSwim flags as ``FreeSwimOptions`` fields: all but the command's own values
    (target size, frames, steps, guidance, seed, backend), which each command owns and adds."""
    base: tuple[Any, Any] = (None, None)
    if args.base_size is not None:
        base = parse_size(args.base_size)
    if args.cache_interval is None or args.cache_interval < 1:
        raise ValueError(f"--cache-interval must be >= 1 (1 = no cache), got {args.cache_interval!r}.")
    return dict(
        base_height=base[0],
        base_width=base[1],
        strength=args.strength,
        flow_shift=args.flow_shift,
        cache_interval=args.cache_interval,
        attention_scale=_scale(args.freeswim_scale),
        cache_budget_bytes=None if args.cache_budget is None else parse_bytes(args.cache_budget),
        cache_overflow=args.cache_overflow,
    )


def freeswim_options_from_args(
    args: argparse.Namespace,
    *,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int | None,
    backend: str = "auto",
    block_size: int | None = None,
    output_type: str = "np",
) -> FreeSwimOptions:
    """``FreeSwimOptions`` from the parsed FreeSwim flags plus the command's own values."""
    from vidsparse.freeswim.two_stage import FreeSwimOptions

    return FreeSwimOptions(
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        backend=backend,
        block_size=block_size,
        seed=seed,
        output_type=output_type,
        **freeswim_settings_from_args(args),
    )
