"""torchrun worker (gloo, CPU): a tiny Wan transformer under diffusers' Ulysses context parallelism
with vidsparse applied; rank 0 writes the output to the path in argv[1]."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import vidsparse as vs
from vidsparse.models import tiny_inputs, tiny_transformer
from vidsparse.pipelines import get_state


def main(out_path: str) -> None:
    torch.accelerator.device_count = lambda: 1  # diffusers' CP setup asks for an accelerator; gloo runs on CPU
    dist.init_process_group("gloo")
    from diffusers import ContextParallelConfig

    results = {}
    for order in ("apply_first", "parallel_first"):
        model = tiny_transformer("wan", seed=0)
        inputs = tiny_inputs("wan", model, frames=4, height=8, width=8, seed=1)
        cfg = vs.SparseConfig("radial", backend="torch", dense_first_steps=0, dense_layers=())
        parallel = ContextParallelConfig(ulysses_degree=dist.get_world_size())
        if order == "apply_first":
            vs.apply(model, cfg)
            model.enable_parallelism(config=parallel)
        else:
            model.enable_parallelism(config=parallel)
            vs.apply(model, cfg)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        results[order] = {"out": out, "sparse": get_state(model).calls["sparse"]}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    # Every rank done, then leave without C++ teardown: tearing down gloo with the process groups of
    # diffusers' device mesh aborted at exit twice under load (torch 2.13 and 2.11, "terminate called
    # without an active exception"), after the results were saved and a barrier. The abort is in
    # the destructors of a test process, not in what the test checks.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
