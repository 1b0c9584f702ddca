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


def test_values_read_as_yaml_1_2_booleans_and_floats():
    """`--set train.amp=off` is the string off (YAML 1.1 would give False, then 'False'), `1e-4` a float (YAML 1.1
    would give the string '1e-4'); only true/false are booleans."""
    cfg = load_config("classifier", None, ["train.amp=off", "train.lr=1e-4", "train.weight_decay=5E-4",
                                           "train.milestones=[10, 2e1]"])
    assert cfg["train"]["amp"] == "off" and cfg["train"]["lr"] == 1e-4 and cfg["train"]["weight_decay"] == 5e-4
    assert cfg["train"]["milestones"] == [10, 20.0] and isinstance(cfg["train"]["milestones"][0], int)
    assert load_config("classifier", None, ["train.normalize=false"])["train"]["normalize"] is False
    with pytest.raises(OODBenchError, match="must be true or false, got 'no'"):
        load_config("classifier", None, ["train.normalize=no"])


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
