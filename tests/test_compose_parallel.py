"""vidsparse under diffusers' context parallelism: Ulysses (2 ranks, torchrun, gloo on CPU) equals
the single-process sparse result in both orders; ring attention and models without ``_cp_plan``
are refused with clear messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ContextParallelConfig, ParallelConfig

import vidsparse as vs
from vidsparse.models import tiny_inputs, tiny_transformer

# torchrun workers: outside the quick subset (pytest -m "not slow"), always in CI
pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


def _cfg():
    return vs.SparseConfig("radial", backend="torch", dense_first_steps=0, dense_layers=())


def _fake_parallel(model, **cp):
    """What ``enable_parallelism`` records, without a process group (the checks read only this)."""
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**cp))


def test_ulysses_two_ranks_equals_single_process(tmp_path):
    model = tiny_transformer("wan", seed=0)
    inputs = tiny_inputs("wan", model, frames=4, height=8, width=8, seed=1)
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
        vs.apply(model, _cfg())
        sparse = model(**inputs, return_dict=False)[0]
    assert not torch.allclose(dense, sparse)
    out = tmp_path / "out.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "cp_worker.py",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out)
    for order, res in results.items():
        assert res["sparse"] == 2, order  # both self-attention layers ran sparse on rank 0
        torch.testing.assert_close(res["out"], sparse, atol=1e-5, rtol=1e-5)


def test_ring_attention_is_refused_at_apply_time():
    model = tiny_transformer("wan", seed=0)
    _fake_parallel(model, ring_degree=2)
    with pytest.raises(ValueError, match="ring attention.*splits the key sequence"):
        vs.apply(model, _cfg())


def test_ring_enabled_after_apply_is_refused_at_the_forward():
    model = tiny_transformer("wan", seed=0)
    inputs = tiny_inputs("wan", model, frames=4, height=8, width=8, seed=1)
    vs.apply(model, _cfg())
    _fake_parallel(model, ring_degree=2)
    with pytest.raises(ValueError, match="ring attention"):
        model(**inputs)


def test_model_without_cp_plan_is_refused(monkeypatch):
    model = tiny_transformer("hunyuan", seed=0)
    assert type(model)._cp_plan is None
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    _fake_parallel(model, ulysses_degree=2)
    with pytest.raises(ValueError, match="has no _cp_plan"):
        vs.apply(model, _cfg())
