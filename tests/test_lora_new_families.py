"""The newer families: each pipeline trains or is refused at argument-check time with its family's reason.

``train_lora`` reads only ``model_index.json`` (``vidsparse.lora.models.check_trainable``) before it
scans the data, creates the output folder or loads a weight, so each case here is a folder holding
just that file: a refused pipeline's error names the class and the record's own reason, and the
(absent) data folder and output folder show that no work started. The trained ones (SkyReels-V2
T2V / I2V, HunyuanVideo 1.5 T2V / I2V, ...) pass the check (their training: tests/test_lora_skyreels.py,
tests/test_lora_hunyuan15.py, ...).
"""

import json

import diffusers
import pytest

from vidsparse.families import families, family_of_pipeline
from vidsparse.lora import TrainConfig, train_lora
from vidsparse.lora.models import check_trainable
from vidsparse.lora.models import families as adapters

NEW = ("cosmos", "kandinsky5", "hunyuan15", "ltx2", "skyreels-v2", "wan-vace", "wan-animate", "hunyuan-framepack")
TRAINED = {name for cls in adapters() for name in cls.pipeline_classes}
CASES = sorted(
    (fam.name, n)
    for fam in families()
    if fam.name in NEW
    for n in dir(diffusers)
    if n.endswith("Pipeline") and "Modular" not in n and family_of_pipeline(n) is fam
)


def test_every_new_family_has_its_pipelines_here():
    assert {fam for fam, _ in CASES} == set(NEW)
    assert {"SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline"} <= {n for _, n in CASES} & TRAINED
    cosmos = {n for fam, n in CASES if fam == "cosmos"}
    assert cosmos & TRAINED == {"Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline"}
    assert cosmos - TRAINED == {"Cosmos2_5_TransferPipeline", "Cosmos2TextToImagePipeline",
                                "CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline"}  # fmt: skip


@pytest.mark.parametrize(("family", "pipeline"), CASES)
def test_trains_or_refuses_before_any_work(family, pipeline, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if pipeline in TRAINED:
        check_trainable(str(folder))
        return
    fam = family_of_pipeline(pipeline)
    reason = fam.lora_refusals.get(pipeline) or fam.lora_refusal
    out, data = tmp_path / "out", tmp_path / "no-such-data"
    with pytest.raises(ValueError) as err:
        train_lora(TrainConfig(model=str(folder), data_dir=str(data), output_dir=str(out)))
    assert pipeline in str(err.value) and reason in str(err.value)
    assert not out.exists()  # refused before the output folder (and before the data scan: data is absent)


@pytest.mark.parametrize(
    ("family", "pipeline"), [c for c in CASES if c[1] not in TRAINED and c[0] != "hunyuan-framepack"]
)
def test_each_refusal_names_a_pipeline_to_train_instead(family, pipeline):
    """A refused pipeline's reason says what to train instead: a pipeline class train-lora trains.
    (HunyuanVideo Framepack is not patched by vidsparse at all, so it has no LoRA alternative.)"""
    fam = family_of_pipeline(pipeline)
    reason = fam.lora_refusals.get(pipeline) or fam.lora_refusal
    assert any(name in reason for name in TRAINED), reason


def test_tiny_names_are_checked_by_the_class_they_build(tmp_path):
    with pytest.raises(ValueError, match="LTX2Pipeline.*audio"):
        train_lora(TrainConfig(model="tiny-ltx2", data_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "o")))
    check_trainable("tiny-hunyuan15")
    check_trainable("tiny-hunyuan15-i2v")
    check_trainable("tiny-wan-i2v")
    check_trainable("tiny-skyreels-v2-i2v")
    check_trainable("tiny-cosmos")  # Predict2.5
    check_trainable("tiny-cosmos2-video2world")
