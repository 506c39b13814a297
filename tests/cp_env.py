"""Whether diffusers' own context parallelism can run on the CPU ranks of the multi-process tests.

diffusers builds its device mesh on torch's current accelerator. A CPU build of torch has none
(the mesh is on the CPU, where the gloo ranks compute); a CUDA build of torch on a machine
without a GPU still reports ``cuda``, and vidsparse then rightly falls back to its own Ulysses
("the ranks compute on cpu but diffusers builds its device mesh on the cuda accelerator").
"""

from __future__ import annotations

import torch

_accelerator = torch.accelerator.current_accelerator()
MESH_DEVICE = "cpu" if _accelerator is None else _accelerator.type
DIFFUSERS_CP_ON_CPU = MESH_DEVICE == "cpu"
FALLBACK_REASON = f"the ranks compute on cpu but diffusers builds its device mesh on the {MESH_DEVICE} accelerator"
