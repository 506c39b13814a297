"""Offline quick start: apply, run and remove sparse attention on a tiny Wan pipeline (CPU, seconds).

The pipeline is diffusers' real WanPipeline at tiny sizes with random weights (``tiny-random``,
built in code, no download), not the trained ``tiny`` model ``vidsparse generate`` uses by
default; the differences printed are on its output latents.

python examples/quickstart_tiny.py
"""

import torch

import vidsparse as vs
from vidsparse.models import build_tiny_pipeline, run_tiny_pipeline


def main() -> None:
    pipe = build_tiny_pipeline(seed=0)
    dense = run_tiny_pipeline(pipe, num_inference_steps=4)

    vs.apply(pipe, vs.SparseConfig("radial", dense_first_steps=1, backend="torch"))
    sparse = run_tiny_pipeline(pipe, num_inference_steps=4)
    vs.remove(pipe)
    restored = run_tiny_pipeline(pipe, num_inference_steps=4)

    print(f"sparse vs dense latents, max abs difference: {(sparse - dense).abs().max().item():.4f}")
    print(f"after remove(), identical to dense: {torch.equal(restored, dense)}")


if __name__ == "__main__":
    main()
