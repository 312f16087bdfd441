"""The training config: YAML + `--section.key value` overrides, typed, validated all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from multilora.config import TrainConfig, config_from_dict, help_text, load_config, parse_overrides, valid_keys
from multilora.errors import MultiLoRAError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "method: multilora\nadapter: {n: 2, r: 4}\noptim:\n  lr: 3e-4\n")
    c = load_config(path, ["--adapter.n", "4", "--optim.lr=1e-3", "--data.tasks", "[rte, wic]",
                           "--train.max_steps", "7", "--data.chat", "true"])
    assert (c.adapter.n, c.adapter.r, c.optim.lr) == (4, 4, 1e-3)
    assert c.data.tasks == ["rte", "wic"] and c.train.max_steps == 7 and c.data.chat is True
    assert isinstance(c.optim.lr, float)
    assert load_config(path).optim.lr == 3e-4  # PyYAML reads "3e-4" as a string; a float field accepts it


def test_resolved_yaml_round_trips(tmp_path):
    c = load_config(None, ["--method", "lora", "--adapter.r", "24", "--data.mixture", "weights",
                           "--data.tasks", "[rte, wic]", "--data.weights", "{rte: 1, wic: 3}"])
    again = load_config(write(tmp_path, c.to_yaml()))
    assert again == c and isinstance(again, TrainConfig)
    assert config_from_dict(c.to_dict()) == c


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(MultiLoRAError, match=r"unknown key 'adapter\.rank'; did you mean 'adapter\.r'\?"):
        load_config(None, ["--adapter.rank", "4"])
    with pytest.raises(MultiLoRAError, match=r"unknown key 'optim\.learning_rate'; did you mean 'optim\.lr'"):
        load_config(write(tmp_path, "optim: {learning_rate: 0.1}\n"))
    with pytest.raises(MultiLoRAError, match=r"unknown key 'trian\.max_steps'; did you mean 'train\.max_steps'"):
        load_config(None, ["--trian.max_steps", "3"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(MultiLoRAError, match=r"adapter\.n = 'three' has the wrong type: expected an integer"):
        load_config(None, ["--adapter.n", "three"])
    with pytest.raises(MultiLoRAError, match=r"optim\.lr = 'fast' has the wrong type: expected a number"):
        load_config(None, ["--optim.lr", "fast"])
    with pytest.raises(MultiLoRAError, match=r"data\.tasks = 'rte' has the wrong type: expected a list of a string"):
        load_config(None, ["--data.tasks", "rte"])
    with pytest.raises(MultiLoRAError, match=r"data\.chat = 'maybe' has the wrong type: expected true or false"):
        load_config(None, ["--data.chat", "maybe"])


def test_missing_model_path():
    with pytest.raises(MultiLoRAError, match=r"model '/no/such/model' is not a local folder .*--model PATH"):
        load_config(None, ["--model", "/no/such/model"])


def test_model_folder_without_config_json(tmp_path):
    with pytest.raises(MultiLoRAError, match="has no config.json"):
        load_config(None, ["--model", str(tmp_path)])


def test_every_problem_is_reported_at_once():
    with pytest.raises(MultiLoRAError) as e:
        load_config(None, ["--adapter.rank", "4", "--optim.lr", "x", "--method", "qlora", "--train.batch_size", "0",
                           "--data.tasks", "[rte, rtee]"])
    msg = str(e.value)
    assert msg.startswith("5 problem(s)")
    for part in ("adapter.rank", "optim.lr = 'x'", "method = 'qlora'", "train.batch_size = 0 must be > 0",
                 "unknown task 'rtee' (did you mean 'rte'?)"):
        assert part in msg, part


def test_value_rules():
    cases = {
        ("--optim.schedule", "cosin"): r"optim\.schedule = 'cosin' is not valid \(did you mean 'cosine'\?\)",
        ("--train.mixed_precision", "fp8"): r"train\.mixed_precision = 'fp8' is not valid",
        ("--optim.betas", "[0.9]"): r"optim\.betas = \[0\.9\] must be two numbers",
        ("--data.weights", "{rte: 1}"): r"data\.weights is set but data\.mixture is 'proportional'",
        ("--train.epochs", "3"): r"train\.max_steps = 100 and train\.epochs = 3\.0 are both set",
        ("--optim.warmup_steps", "100"): r"optim\.warmup_steps = 100 must be below train\.max_steps = 100",
        ("--adapter.dropout", "1.5"): r"adapter\.dropout = 1\.5 must be in \[0, 1\)",
    }
    for args, pattern in cases.items():
        with pytest.raises(MultiLoRAError, match=pattern):
            load_config(None, list(args))


def test_lora_is_n1_lora_init_no_scales():
    c = load_config(None, ["--method", "lora", "--adapter.r", "24"])
    assert (c.adapter.n, c.adapter.r, c.adapter.init, c.adapter.scale) == (1, 24, "lora", "none")
    with pytest.raises(MultiLoRAError, match=r"method lora uses adapter\.n = 1, got 3; drop adapter\.n"):
        load_config(None, ["--method", "lora", "--adapter.n", "3"])
    full = load_config(None, ["--method", "full", "--adapter.r", "0"])  # adapter options are ignored by full
    assert full.method == "full"


def test_file_problems(tmp_path):
    with pytest.raises(MultiLoRAError, match="config file .* not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(MultiLoRAError, match="is not valid YAML"):
        load_config(write(tmp_path, "adapter: [\n"))
    with pytest.raises(MultiLoRAError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(MultiLoRAError, match="section 'adapter' must be a mapping"):
        load_config(write(tmp_path, "adapter: 3\n"))


def test_override_syntax():
    assert parse_overrides(["--a.b", "1", "--c=[x, y]", "--d", "-2"]) == {"a.b": 1, "c": ["x", "y"], "d": -2}
    with pytest.raises(MultiLoRAError, match="has no value"):
        parse_overrides(["--adapter.n"])
    with pytest.raises(MultiLoRAError, match="unexpected argument 'x'"):
        parse_overrides(["x"])


def test_help_lists_every_section_and_key():
    text = help_text()
    for key in valid_keys():
        assert key.rsplit(".", 1)[-1] in text
    assert yaml.safe_load(TrainConfig().to_yaml())["adapter"]["targets"] == ["q_proj", "v_proj"]


def test_a_bare_no_is_the_mixed_precision_setting_not_a_boolean():
    """YAML 1.1 reads `no` as false: `--train.mixed_precision no` and `mixed_precision: no` mean 'no'."""
    assert load_config(None, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"
    assert load_config(None, ["--train.mixed_precision", "bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(MultiLoRAError, match="train.mixed_precision = True has the wrong type"):
        load_config(None, ["--train.mixed_precision", "yes"])
