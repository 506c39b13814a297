"""The newer LoRA adapters train under the sparse pattern: it is active in the objective, and a short run learns.

For Cosmos-Predict2 / 2.5, HunyuanVideo 1.5, Kandinsky 5 (T2V, I2V) and Wan VACE on their tiny pipelines, at a clip whose
latent grid is 3 x 8 x 8 tokens (5 x 8 x 8 for Kandinsky I2V) so radial is visibly sparse: the
loss under radial differs from dense (the pattern runs in the self-attention the LoRA targets,
with no dense fallback: only the family's own dense layers run dense), and 15 Adam steps on a fixed batch, with vidsparse's gradient
checkpointing, lower it.
"""

import pytest
import torch
from lora_checks import sparse_objective, square_clip, train_steps

from vidsparse.config import SparseConfig
from vidsparse.families import family_of
from vidsparse.lora import TrainConfig
from vidsparse.lora.data import ClipSpec
from vidsparse.lora.models import load_model
from vidsparse.lora.train import collate_text, flow_loss, lora_config
from vidsparse.pipelines import get_state

pytestmark = pytest.mark.slow  # LoRA training runs

CASES = {
    "tiny-cosmos": ClipSpec(9, 128, 128),  # Predict2.5 (text2world)
    "tiny-cosmos2-video2world": ClipSpec(9, 128, 128),  # Predict2, first frame as the condition
    "tiny-hunyuan15": ClipSpec(9, 128, 128),
    "tiny-kandinsky5": ClipSpec(9, 128, 128),
    "tiny-kandinsky5-i2v": ClipSpec(17, 128, 128),
    "tiny-wan-vace": ClipSpec(9, 128, 128),
}
SPARSE = SparseConfig("radial", dense_first_steps=0, backend="torch", block_size=16)


@pytest.mark.parametrize("model", sorted(CASES))
def test_sparse_pattern_is_trained(model, tmp_path):
    adapter = load_model(model)
    spec = CASES[model]
    adapter.validate_clip(spec)
    encoded = [adapter.encode_clip(square_clip(spec, d)) for d in (0, 1)]
    x0 = torch.cat([e["latents"] for e in encoded])
    cond = {k: torch.cat([e[k] for e in encoded]) for k in encoded[0] if k != "latents"}
    text = {**collate_text([adapter.encode_text(c) for c in ("a red square slides", "a blue square")]), **cond}
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path), rank=4),
                                         adapter))  # fmt: skip
    sigma = torch.tensor([0.35, 0.7])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return flow_loss(adapter, transformer, x0, text, sigma, noise)

    dense, before = sparse_objective(transformer, loss, SPARSE)
    state = get_state(transformer)
    kept_dense = len(family_of(transformer).default_schedule("radial")[1])  # the family's dense layers (Wan: 0)
    assert state.calls["sparse"] > 0 and state.calls["dense"] == kept_dense  # no dense fallback
    assert abs(before - dense) > 1e-5  # the pattern changes the objective trained
    after = train_steps(transformer, loss, 15)
    assert after < 0.9 * before, (before, after)
