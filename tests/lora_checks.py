"""What the LoRA tests (``tests/test_lora_*.py``) build and run the same way, in one place.

- synthetic clips: a square crossing the frame, in [-1, 1] (``square_clip``) or on 8-bit levels
  so its first frame is exactly a PIL image, as an image-to-video user passes it
  (``square_clip_8bit``, ``stepping_square_8bit``);
- a short training run under a sparse pattern on a fixed batch (``sparse_objective`` then
  ``train_steps``): the loss before and after, with vidsparse's gradient checkpointing;
- the end-to-end ``train-lora`` on the 3-clip test dataset then ``generate --lora``
  (``train_tiny``, ``generate_tiny``), as a user runs them on a tiny model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vidsparse.lora.data import ClipSpec


def square_clip(spec: ClipSpec, direction: int) -> torch.Tensor:
    """A bright square moving right (0, red) or down (1, green) on a dark background: [1, 3, F, H, W] in [-1, 1]."""
    video = torch.full((1, 3, spec.num_frames, spec.height, spec.width), -0.8)
    side = spec.height // 4
    for f in range(spec.num_frames):
        off = f * (spec.width - side) // max(1, spec.num_frames - 1)
        y, x = (spec.height // 3, off) if direction == 0 else (off, spec.width // 3)
        video[0, direction, f, y : y + side, x : x + side] = 0.9
    return video


def square_clip_8bit(spec: ClipSpec, background: float = 40.0, level: float = 210.0, channel: int = 0) -> torch.Tensor:
    """A square crossing the frame left to right, [1, 3, F, H, W] in [-1, 1] on 8-bit levels (each frame
    is exactly a PIL image): ``level`` on ``channel`` over a ``background`` grey, a quarter of the height."""
    video = torch.full((1, 3, spec.num_frames, spec.height, spec.width), background)
    side = spec.height // 4
    for f in range(spec.num_frames):
        x = f * (spec.width - side) // (spec.num_frames - 1)
        video[0, channel, f, side : 2 * side, x : x + side] = level
    return video / 127.5 - 1.0


def stepping_square_8bit(spec: ClipSpec, side: int = 16) -> torch.Tensor:
    """A red ``side`` x ``side`` square from row 8, two pixels right per frame, on 8-bit levels in [-1, 1]."""
    video = torch.full((1, 3, spec.num_frames, spec.height, spec.width), 25.0)
    for f in range(spec.num_frames):
        video[0, 0, f, 8 : 8 + side, 2 * f : 2 * f + side] = 220.0
    return video / 127.5 - 1.0


def lora_module_names(module: torch.nn.Module) -> set[str]:
    """The modules of ``module`` that carry a LoRA (peft's ``lora_A`` with at least one adapter)."""
    return {n for n, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def sparse_objective(transformer: torch.nn.Module, loss: Callable[[], torch.Tensor], config) -> tuple[float, float]:
    """(dense loss, loss with ``config`` applied): the loss once unpatched, then under the sparse pattern."""
    from vidsparse.pipelines import apply

    with torch.no_grad():
        dense = loss().item()
        apply(transformer, config)
        before = loss().item()
    return dense, before


def train_steps(transformer: torch.nn.Module, loss: Callable[[], torch.Tensor], steps: int, lr: float = 2e-2) -> float:
    """``steps`` Adam steps on the trainable (LoRA) parameters of a fixed-batch ``loss``, with vidsparse's
    gradient checkpointing as ``train-lora`` runs it; the transformer is back in eval mode and the
    loss after is returned."""
    from vidsparse.lora.sparse import enable_gradient_checkpointing

    enable_gradient_checkpointing(transformer)
    transformer.train()
    opt = torch.optim.Adam([p for p in transformer.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    transformer.eval()
    with torch.no_grad():
        return loss().item()


def train_tiny(tmp_path: Path, model: str, spec: ClipSpec, **config: Any):
    """``train_lora`` of ``model`` on the 3-clip test dataset (``test_lora_data.make_dataset``): rank 4,
    2 steps (saved at step 2), fp32, the torch backend, radial; ``config`` overrides. Checks the two
    losses are finite; returns (the result, the output folder)."""
    from test_lora_data import make_dataset

    from vidsparse.lora import TrainConfig, train_lora

    out = tmp_path / "out"
    options = dict(data_dir=str(make_dataset(tmp_path / "data")), output_dir=str(out), model=model,
                   num_frames=spec.num_frames, height=spec.height, width=spec.width, rank=4, max_train_steps=2,
                   checkpointing_steps=2, mixed_precision="no", attention_backend="torch", pattern="radial",
                   progress=False)  # fmt: skip
    result = train_lora(TrainConfig(**{**options, **config}))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses))), result.losses
    return result, out


def generate_tiny(model: str, lora: Path, spec: ClipSpec, image_of: torch.Tensor | None = None, **options: Any):
    """``generate`` of ``model`` with ``lora`` at ``spec``'s size, 2 steps on the torch backend; an
    image-to-video run gets the first frame of the clip ``image_of`` ([1, 3, F, H, W] in [-1, 1]) as an
    image file, as a user passes it. Checks the frames' size; returns the result."""
    from vidsparse.generation import GenerateOptions, generate
    from vidsparse.lora.adapters.base import first_frame_image

    if image_of is not None:
        image = lora.parent / "first.png"
        first_frame_image(image_of[0]).save(image)
        options["image"] = str(image)
    res = generate(GenerateOptions(model=model, lora=str(lora), frames=spec.num_frames, height=spec.height,
                                   width=spec.width, steps=2, backend="torch", progress=False, **options))  # fmt: skip
    assert res.frames.shape[:3] == (spec.num_frames, spec.height, spec.width)
    return res


def snapshot(kwargs: dict[str, Any], tensors_only: bool = False) -> dict[str, Any]:
    """A copy of a module call's keyword arguments (tensors detached and cloned; others as they are,
    or left out with ``tensors_only``), so a later call cannot change what was recorded."""
    return {
        k: v.detach().clone() if torch.is_tensor(v) else v
        for k, v in kwargs.items()
        if torch.is_tensor(v) or not tensors_only
    }


def predict_inputs(adapter, transformer: torch.nn.Module, noisy, timestep, text, tensors_only: bool = False) -> dict:
    """What ``adapter.predict`` hands ``transformer`` (its last call's keyword arguments, ``snapshot``):
    the oracle tests compare it to what the real pipeline's sampler fed the transformer."""
    seen = []
    handle = transformer.register_forward_hook(lambda m, a, k, o: seen.append(snapshot(k, tensors_only)),
                                               with_kwargs=True)  # fmt: skip
    try:
        with torch.no_grad():
            adapter.predict(transformer, noisy, timestep, text)
    finally:
        handle.remove()
    return seen[-1]


def check_on_flow_path(adapter, hidden, x0, noise, timestep=None, atol: float = 2e-4, timestep_atol: float = 1e-3):
    """The noise level ``s`` of a sampler's transformer input ``hidden``, checked to lie on the training's
    straight path ``x0 + s (noise - x0)`` (within ``atol``) and, given the ``timestep`` it was fed, that
    this is the adapter's ``transformer_timestep(s)`` (within ``timestep_atol``)."""
    d = noise - x0
    s = float(((hidden - x0) * d).sum() / (d * d).sum())
    torch.testing.assert_close(hidden, x0 + s * d, rtol=0, atol=atol)
    if timestep is not None:
        torch.testing.assert_close(
            timestep, adapter.transformer_timestep(torch.tensor([s])), rtol=0, atol=timestep_atol
        )
    return s


def pipeline_calls(
    transformer: torch.nn.Module,
    run: Callable[[], Any],
    output: torch.Tensor | Callable[[int, dict[str, Any]], torch.Tensor] | None = None,
    tensors_only: bool = False,
) -> tuple[Any, list[dict[str, Any]]]:
    """``run()`` (a real pipeline's ``__call__``) with every call of ``transformer`` recorded (``snapshot``
    of its keyword arguments). ``output``: what the transformer returns instead of its own output (an
    ideal model of the trained objective put into the sampler): a tensor, or ``f(call index, kwargs)``.
    Returns (what ``run`` returned, the calls)."""
    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs, out):
        calls.append(snapshot(kwargs, tensors_only))
        if output is None:
            return out
        value = output(len(calls) - 1, kwargs) if callable(output) else output
        return (value.to(out[0].dtype),)

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return result, calls
