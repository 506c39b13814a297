"""Every diffusers pipeline a vidsparse family serves either trains or is refused with its own reason.

The reason comes from the family record (``lora_refusals[pipeline]``, else ``lora_refusal`` for a
family without an adapter), never the generic "not supported yet" message, so a user of any of
those pipelines learns what is missing (e.g. CogVideoX I2V's image-latent channels).
"""

import diffusers
import pytest

from vidsparse.families import families, family_of_pipeline
from vidsparse.lora.models import adapter_for
from vidsparse.lora.models import families as adapters

TRAINED = {name for cls in adapters() for name in cls.pipeline_classes}
SERVED = sorted(
    n
    for n in dir(diffusers)
    if n.endswith("Pipeline") and "Modular" not in n and family_of_pipeline(n) is not None and n not in TRAINED
)


def test_every_family_trains_or_says_why():
    for fam in families():
        assert fam.lora_adapter is not None or len(fam.lora_refusal) > 40, fam.name
    assert {"WanPipeline", "CogVideoXPipeline", "HunyuanVideoPipeline", "LTXPipeline", "MochiPipeline"} <= TRAINED


@pytest.mark.parametrize("name", SERVED)
def test_refused_pipeline_names_its_reason(name):
    fam = family_of_pipeline(name)
    reason = fam.lora_refusals.get(name) or fam.lora_refusal
    assert reason, f"{name} ({fam.name}) has no LoRA refusal reason in its family record"
    pipe = object.__new__(getattr(diffusers, name))  # refused by class, before anything is read
    with pytest.raises(ValueError) as err:
        adapter_for(pipe, "some/model")
    assert reason in str(err.value) and name in str(err.value)
