"""torch.compile of patched pipelines: diffusers' regional compile (``compile_repeated_blocks(
fullgraph=True)``) with the torch, flex and triton (interpreter on CPU) backends, and whole-model
compile; graphs and graph breaks are counted, and a second / third pipeline run compiles nothing."""

from __future__ import annotations

import pytest
import torch
from compose_pipelines import run, tiny_pipeline
from torch._dynamo.utils import counters

import vidsparse as vs

# torch.compile of whole pipelines: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _pipe(family: str, backend: str):
    pipe = tiny_pipeline(family)
    if backend == "triton":  # the triton kernels need a head dim of at least 16
        from diffusers import WanTransformer3DModel

        from vidsparse.families.wan import tiny_transformer_kwargs

        torch.manual_seed(0)
        pipe.transformer = WanTransformer3DModel(**tiny_transformer_kwargs(attention_head_dim=16))
    # dense first step, then sparse: the dense/sparse switch happens inside every run
    vs.apply(pipe, vs.SparseConfig("radial", backend=backend, dense_first_steps=1, dense_layers=()))
    return pipe


@pytest.mark.parametrize(
    "family,backend", [("wan", "torch"), ("wan", "flex"), ("wan", "triton"), ("hunyuan", "torch"), ("hunyuan", "flex")]
)
def test_regional_compile_fullgraph_no_recompiles(family, backend):
    pipe = _pipe(family, backend)
    eager = run(pipe, family, steps=3)
    torch._dynamo.reset()
    counters.clear()
    count = CountingBackend()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=count)
    first = run(pipe, family, steps=3)
    graphs = count.graphs
    assert graphs > 0 and not counters["graph_break"]
    for _ in range(2):
        again = run(pipe, family, steps=3)
        torch.testing.assert_close(again, first)
    assert count.graphs == graphs, "a later run recompiled"
    assert not counters["graph_break"]
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-4)


def test_whole_model_compile_graph_breaks_are_bounded_and_nothing_recompiles():
    pipe = _pipe("wan", "torch")
    eager = run(pipe, "wan", steps=3)
    torch._dynamo.reset()
    counters.clear()
    count = CountingBackend()
    pipe.transformer = torch.compile(pipe.transformer, backend=count)
    first = run(pipe, "wan", steps=3)
    graphs, breaks = count.graphs, sum(counters["graph_break"].values())
    # the eager bookkeeping (one torch.compiler.disable'd pre-hook) is the only break per forward
    assert breaks <= 2, dict(counters["graph_break"])
    run(pipe, "wan", steps=3)
    assert count.graphs == graphs and sum(counters["graph_break"].values()) == breaks
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-4)
