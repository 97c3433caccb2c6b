import pytest

from regionclip.config import ModelConfig, dump_config, load_config, list_model_presets
from regionclip.detector import resolve_model_config
from regionclip.errors import BadConfig


def test_yaml_overrides_and_dump_round_trip(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("clip_model: RN50\nmode: pool\nproposals:\n  num_proposals: 50\n")
    cfg = load_config(ModelConfig, path, ["scoring.top_k=3", "text.templates=['a {}']"])
    assert (cfg.clip_model, cfg.mode, cfg.proposals.num_proposals, cfg.scoring.top_k) == ("RN50", "pool", 50, 3)
    assert cfg.text.templates == ["a {}"]
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(ModelConfig, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("text,match", [
    ("mdoe: pool\n", "unknown key 'mdoe' \\(did you mean 'mode'\\?\\)"),
    ("proposals:\n  num_proposals: many\n", "proposals.num_proposals: expected int"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadConfig, match=match):
        load_config(ModelConfig, path)


def test_presets_exist_and_parse():
    assert {"vitb16", "rn50"} <= set(list_model_presets())
    assert resolve_model_config("rn50").mode == "pool"
    assert resolve_model_config("vitb16").mode == "crop"
    with pytest.raises(BadConfig, match="unknown model 'nope'"):
        resolve_model_config("nope")
