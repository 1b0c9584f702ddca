"""Config loading: presets, overrides, unknown keys with suggestions, types."""
import pytest

from oodbench import detectors
from oodbench.config import load_config
from oodbench.errors import OODBenchError


def test_defaults_preset_and_overrides():
    cfg = load_config("classifier")
    assert cfg["model"]["arch"] == "resnet18" and "presets" not in cfg
    quick = load_config("classifier", "quick", ["train.steps=7", "odin.temperature=10", "train.milestones=[1,2]"],
                        sections=detectors.option_sections("classifier"))   # method options: declared in classes
    assert quick["model"]["arch"] == "small_cnn"
    assert quick["train"]["steps"] == 7 and quick["odin"]["temperature"] == 10.0
    assert isinstance(quick["odin"]["temperature"], float) and quick["train"]["milestones"] == [1, 2]


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(OODBenchError, match="Did you mean 'train.steps'"):
        load_config("classifier", None, ["train.step=5"])
    with pytest.raises(OODBenchError, match="Did you mean 'model'"):
        load_config("classifier", None, ["modle.arch=x"])


def test_bad_values_and_presets():
    with pytest.raises(OODBenchError, match="must be a number"):
        load_config("classifier", None, ["train.lr=fast"])
    with pytest.raises(OODBenchError, match="key.subkey=value"):
        load_config("classifier", None, ["train.lr"])
    with pytest.raises(OODBenchError, match="unknown preset"):
        load_config("classifier", "slow")
    with pytest.raises(OODBenchError, match="is a section"):
        load_config("classifier", None, ["train=3"])


def test_override_with_invalid_yaml_is_a_one_line_error():
    from oodbench.cli import main

    for bad in ("train.lr=[1,", "model.mean=[0.5,"):
        with pytest.raises(OODBenchError, match="not a valid YAML value") as info:
            load_config("classifier", None, [bad])
        assert "\n" not in str(info.value)
    from oodbench.workflow import split_model_overrides

    with pytest.raises(OODBenchError, match="not a valid YAML value"):
        split_model_overrides(["model.std={1"])
    assert split_model_overrides(["model.std=[0.5]", "knn.k=3"]) == ({"std": [0.5]}, ["knn.k=3"])
    assert main(["train", "--method", "msp", "--set", "train.lr=[1,"]) == 2
