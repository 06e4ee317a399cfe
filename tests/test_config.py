import pytest

from posttrain.algorithms.sft import SFTConfig
from posttrain.config import load_config, parse_override, save_config, read_yaml
from posttrain.errors import ConfigError


def test_overrides_are_typed():
    cfg = load_config(SFTConfig, None, ["train.lr=3e-5", "train.max_steps=7", "lora.enabled=true",
                                        "lora.target_modules=q_proj,v_proj", "data.eval=null"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.lora.enabled is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.eval is None


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["train.learning_rate=1e-5"])
    assert "unknown config key 'train.learning_rate'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["trian.lr=1e-5"])
    assert "did you mean 'train.lr'" in str(e.value)


@pytest.mark.parametrize("override, where", [
    ("train.lr=-1e-4", "train.lr"),
    ("train.batch_size=10", "train.micro_batch_size"),   # micro 32 cannot form 10
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.schedule=cosin", "train.schedule"),
    ("train.max_steps=abc", "train.max_steps"),
    ("lora.enabled=maybe", "lora.enabled"),
])
def test_impossible_values_fail_before_loading(override, where):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert where in str(e.value)


def test_batch_error_suggests_divisors():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["train.batch_size=12", "train.micro_batch_size=5"])
    assert "[1, 2, 3, 4, 6, 12]" in str(e.value)


def test_yaml_then_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("command: sft\ntrain:\n  lr: 1e-5\n  batch_size: 8\n  micro_batch_size: 4\n")
    cfg = load_config(SFTConfig, f, ["train.batch_size=16"])
    assert cfg.train.lr == 1e-5 and cfg.train.batch_size == 16 and cfg.train.micro_batch_size == 4
    save_config(cfg, tmp_path / "resolved.yaml", command="sft")
    again = load_config(SFTConfig, tmp_path / "resolved.yaml")
    assert again == cfg


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(f)
    assert str(f) in str(e.value)
    with pytest.raises(ConfigError):
        read_yaml(tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_override("a.b=1e-5") == ("a.b", 1e-5)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_partial_section_keeps_command_defaults():
    # SFT's own train defaults (lr 1e-3, 3 epochs) survive overriding one train key
    cfg = load_config(SFTConfig, None, ["train.output_dir=somewhere"])
    assert cfg.train.lr == SFTConfig().train.lr and cfg.train.epochs == SFTConfig().train.epochs
    assert cfg.train.output_dir == "somewhere"


def test_yaml_boolean_words_keep_the_option_they_name():
    """`train.mixed_precision=no` (YAML 1.1 reads 'no' as false) is the option 'no', not an error."""
    from posttrain.algorithms.sft import SFTConfig
    from posttrain.config import load_config

    cfg = load_config(SFTConfig, None, ["train.mixed_precision=no"], command="sft")
    assert cfg.train.mixed_precision == "no"
