"""The generate library: a video from a diffusers pipeline whose self-attention runs a sparse pattern.

``vidsparse generate`` (``vidsparse.generate_cli``) is a thin argparse layer over this package;
scripts and tests call it directly::

    from vidsparse.generation import GenerateOptions, generate, format_summary
    result = generate(GenerateOptions(model="tiny", prompt="a red ball", pattern="radial"))
    print(format_summary(result))

Modules, in the order a run uses them: ``model`` (which model ``--model`` names, from its
config files), ``options`` (``GenerateOptions``, validation, ``prepare`` -> ``GenerationPlan``),
``loading`` (pipeline, LoRA, compile), ``call`` (one pipeline call's kwargs and step clock),
``meter`` (per-layer densities), ``result`` (``GenerateResult``, ``format_summary``), ``run``
(``generate``). ``vidsparse.parallel.generate`` reuses them for multi-GPU runs.
"""

from vidsparse.generation.call import StepClock, call_kwargs, run_pipeline, warmup
from vidsparse.generation.loading import compile_pipeline, load_lora, load_pipeline, place_pipeline
from vidsparse.generation.meter import DensityRecorder, SparseMeter, group_densities
from vidsparse.generation.model import TINY, TINY_DEFAULTS, ModelInfo, resolve_model, tiny_models
from vidsparse.generation.options import DTYPES, PARALLEL_MODES, GenerateOptions, GenerationPlan, prepare
from vidsparse.generation.result import DenseComparison, GenerateResult, LayerGroupDensity, format_summary
from vidsparse.generation.run import generate

__all__ = [
    "DTYPES",
    "PARALLEL_MODES",
    "TINY",
    "TINY_DEFAULTS",
    "DenseComparison",
    "DensityRecorder",
    "GenerateOptions",
    "GenerateResult",
    "GenerationPlan",
    "LayerGroupDensity",
    "ModelInfo",
    "SparseMeter",
    "StepClock",
    "call_kwargs",
    "compile_pipeline",
    "format_summary",
    "generate",
    "group_densities",
    "load_lora",
    "load_pipeline",
    "place_pipeline",
    "prepare",
    "resolve_model",
    "run_pipeline",
    "tiny_models",
    "warmup",
]
