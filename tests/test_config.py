from pathlib import Path

import pytest

from synthtune.config import ConfigError, DemoConfig, SynthConfig, TrainConfig, field_help, load_config

REPO = Path(__file__).resolve().parents[1]

# Every shipped recipe, with the config class it must parse into (torchtune's test_configs idea).
SHIPPED = {"configs/demo.yaml": DemoConfig, "configs/synth/smollm2_bundled.yaml": SynthConfig,
           "configs/synth/openai_vllm.yaml": SynthConfig,
           **{f"configs/train/{n}.yaml": TrainConfig for n in ("smoke", "smollm2_lora_cpu", "flan_ul2_lora",
                                                                "flan_ul2_full", "llama_1b_lora", "llama_8b_lora_zero3")}}


@pytest.mark.parametrize("rel", sorted(SHIPPED))
def test_every_shipped_config_parses(rel):
    cfg = load_config(SHIPPED[rel], REPO / rel)
    assert isinstance(cfg, SHIPPED[rel])
    # the run command sits at the top of every config
    first = (REPO / rel).read_text().splitlines()[0]
    assert first.startswith(("# synthtune ", "# accelerate launch ")), first


def test_all_configs_are_registered():
    found = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
             if "accelerate" not in p.parts}
    assert found <= set(SHIPPED), f"add {found - set(SHIPPED)} to SHIPPED with its config class"


def test_precedence_defaults_yaml_overrides_kwargs(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("synth_questions: 3\nshots: 4\nmodel: tiny-llama\n")
    cfg = load_config(DemoConfig, p, ["shots=2", "device=cpu"], model="tiny-t5")
    assert (cfg.synth_questions, cfg.shots, cfg.device, cfg.model) == (3, 2, "cpu", "tiny-t5")
    assert cfg.eval_max_new_tokens == DemoConfig().eval_max_new_tokens


def test_unknown_key_names_file_line_and_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-llama\n\ntrain_step: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, p)
    msg = str(err.value)
    assert f"{p}:3" in msg and "'train_step'" in msg and "Did you mean 'train_steps'" in msg
    assert "eval_max_new_tokens" in msg  # the list of valid keys


def test_wrong_type_and_bad_choice(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("shots: eight\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: shots: expected an integer"):
        load_config(DemoConfig, p)
    with pytest.raises(ConfigError, match="train_format must be one of plain, chat, auto"):
        load_config(DemoConfig, None, ["train_format=html"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(DemoConfig, None, ["shots"])


def test_bad_yaml_points_at_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-llama\nshots: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(DemoConfig, p)


@pytest.mark.parametrize("cls", [DemoConfig, SynthConfig, TrainConfig])
def test_every_field_has_help(cls):
    assert all(field_help(cls).values())


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_open_with_their_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    first = path.read_text().splitlines()[0]
    assert "accelerate launch --config_file configs/accelerate/" + path.name in first
    cfg = load_config_from_file(str(path))  # accelerate's own loader: unknown keys raise
    assert cfg.num_processes >= 1 and cfg.distributed_type is not None
