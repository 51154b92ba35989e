import sys
from dataclasses import fields
from pathlib import Path

import pytest

from synthtune.config import DemoConfig, ServeConfig, SynthConfig, TrainConfig, field_help, load_config
from synthtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

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
    # lm_eval/ holds lm-evaluation-harness task files, run by tests/test_serve_lm_eval.py
    found = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
             if "accelerate" not in p.parts and "lm_eval" not in p.parts}
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


def test_a_forbidden_character_a_mapping_and_a_huge_number_are_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-llama\nshots: \x07 3\n")  # named a position, not a line
    with pytest.raises(ConfigError, match=r"c.yaml:2: not valid YAML: unacceptable character #x0007"):
        load_config(DemoConfig, p)
    p.write_text("model: tiny-llama\nlora_targets:\n  q: 1\n")  # showed an internal class
    with pytest.raises(ConfigError, match=r"c.yaml:2: lora_targets: expected a list .*, got a mapping \(key: value\)"):
        load_config(TrainConfig, p)
    for digits in (401, 5001):  # was an OverflowError; past 4,300 digits str() of it fails too
        with pytest.raises(ConfigError, match=f"an integer of about {digits} digits is too large"):
            load_config(ServeConfig, None, (), read_timeout=10**(digits - 1))


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


# --------------------------------------------------------------------------------------------
# values read as written (YAML 1.2 scalars) and declared ranges
# --------------------------------------------------------------------------------------------


def test_string_fields_get_the_text_as_written(tmp_path):
    """Regression: YAML 1.1 made served_model=no the boolean False ("False") and 0123 the octal 83."""
    p = tmp_path / "c.yaml"
    p.write_text("served_model: no\nmodel: 0123\nquestions: 1e3\nout: 'null'\n")
    cfg = load_config(SynthConfig, p)
    assert (cfg.served_model, cfg.model, cfg.questions, cfg.out) == ("no", "0123", "1e3", "null")
    cfg = load_config(SynthConfig, None, ["served_model=no", "model=0123", "out=on", "exemplars=~"])
    assert (cfg.served_model, cfg.model, cfg.out, cfg.exemplars) == ("no", "0123", "on", None)
    # YAML quoting keeps text that would otherwise mean null or lose its spaces
    cfg = load_config(SynthConfig, None, ["served_model='null'", 'out=" a b "', "stop=[no, ' x', 'a,b']"])
    assert (cfg.served_model, cfg.out, cfg.stop) == ("null", " a b ", ["no", " x", "a,b"])
    assert load_config(SynthConfig, None, ["stop=a,b", "endpoints="]).stop == ["a", "b"]
    with pytest.raises(ConfigError, match=r"override 'model=null': model: is empty \(null\) but needs a value"):
        load_config(SynthConfig, None, ["model=null"])


@pytest.mark.parametrize("text", ["0123", "-007", "00"])
def test_octal_looking_integers_are_refused_with_the_decimal_spelled_out(tmp_path, text):
    """Regression: `k: 0123` was silently 83 (YAML 1.1 octal)."""
    p = tmp_path / "c.yaml"
    p.write_text(f"model: tiny-llama\nshots: {text}\n")
    decimal = str(int(text))
    for source, where in ((p, f"{p}:2"), (None, f"override 'shots={text}'")):
        with pytest.raises(ConfigError) as err:
            load_config(DemoConfig, source, [] if source else [f"shots={text}"])
        msg = str(err.value)
        assert msg.startswith(f"{where}: shots: got '{text}': a leading zero is ambiguous"), msg
        assert "YAML 1.1 reads 0123 as the octal number 83, YAML 1.2 as 123" in msg and f"write {decimal} " in msg
    assert load_config(DemoConfig, None, ["shots=0", "seed=+5", "learning_rate=0.5"]).seed == 5


def test_booleans_are_true_or_false_only(tmp_path):
    for text, value in (("true", True), ("True", True), ("FALSE", False), ("'false'", False)):
        assert load_config(SynthConfig, None, [f"use_gold={text}"]).use_gold is value
    p = tmp_path / "c.yaml"
    p.write_text("k: 2\nuse_gold: yes\n")
    for source, overrides in ((p, []), *((None, [f"use_gold={t}"]) for t in ("no", "on", "off", "y", "1", "0"))):
        with pytest.raises(ConfigError) as err:
            load_config(SynthConfig, source, overrides)
        msg = str(err.value)
        assert "use_gold: expected true or false" in msg and "true/false (or True, TRUE, False, FALSE)" in msg
        assert "YAML 1.1 reads them as booleans and YAML 1.2 as strings" in msg
    assert f"{p}:2: use_gold" in _error(SynthConfig, p)


def _error(cls, path=None, overrides=(), **values) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(cls, path, list(overrides), **values)
    return str(err.value)


@pytest.mark.parametrize("cls,override,allowed", [
    (SynthConfig, "batch_size=0", "batch_size must be an integer >= 1"),
    (SynthConfig, "top_p=-5", "top_p must be a finite number in (0, 1]"),
    (SynthConfig, "top_p=1.5", "top_p must be a finite number in (0, 1]"),
    (SynthConfig, "temperature=nan", "temperature must be a finite number >= 0; nan is not a number"),
    (SynthConfig, "temperature=.inf", "temperature must be a finite number >= 0; infinity is not allowed"),
    (SynthConfig, "min_agreement=2", "min_agreement must be a finite number in [0, 1]"),
    (SynthConfig, "min_reward=-inf", "min_reward must be a finite number; infinity"),
    (SynthConfig, "request_timeout=0", "request_timeout must be a finite number > 0"),
    (SynthConfig, "concurrency=-3", "concurrency must be an integer >= 1"),
    (TrainConfig, "learning_rate=0", "learning_rate must be a finite number > 0"),
    (TrainConfig, "lora_dropout=1", "lora_dropout must be a finite number in [0, 1)"),
    (TrainConfig, "per_device_batch_size=0", "per_device_batch_size must be an integer >= 1"),
    (TrainConfig, "max_steps=0", "max_steps must be -1 or an integer >= 1"),
    (TrainConfig, "seed=4294967296", "seed must be an integer in [0, 4294967295]"),
    (TrainConfig, "eval_limit=0", "eval_limit must be an integer >= 1"),
    (DemoConfig, "train_batch_size=0", "train_batch_size must be an integer >= 1"),
    (DemoConfig, "k=99999999999999999999", "'99999999999999999999' is too large (integers must fit in 64 bits)"),
])
def test_nonsense_ranges_are_refused_naming_key_source_and_allowed_values(cls, override, allowed):
    """Regression: batch_size=0, top_p=-5 and temperature=nan were all accepted."""
    msg = _error(cls, overrides=[override])
    key = override.split("=")[0]
    assert msg.startswith(f"override {override!r}: {key}"), msg
    assert allowed in msg and "(help: " in msg


def test_ranges_name_the_file_line_and_python_arguments(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# synthtune synth --config c.yaml\nk: 2\n\ntop_p: -5\n")
    assert _error(SynthConfig, p).startswith(f"{p}:4: top_p=-5.0 is out of range: top_p must be a finite number in (0, 1]")
    assert _error(SynthConfig, concurrency=0).startswith("argument concurrency: concurrency=0 is out of range")
    p.write_text("k: 2\nrounds: 1\nk: 3\n")
    assert _error(SynthConfig, p) == f"{p}:3: k is set twice (first at line 1); keep one"


def test_eval_config_ranges_apply_to_its_cli_options():
    from synthtune.config import EvalConfig

    assert "argument k: k=0 is out of range: k must be an integer >= 1" in _error(EvalConfig, k=0)


def test_every_numeric_field_declares_its_range_and_every_default_passes():
    """New fields must say what they allow: a numeric field without a range fails here."""
    import typing

    from config_helpers import base_type, config_classes

    from synthtune.config import Range, check_config

    classes = config_classes()
    assert {c.__name__ for c in classes} >= {"DemoConfig", "SynthConfig", "TrainConfig", "EvalConfig"}
    missing = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if base_type(hints[f.name]) in (int, float):
                if not isinstance(f.metadata.get("range"), Range):
                    missing.append(f"{cls.__name__}.{f.name}")
        check_config(cls())  # the defaults obey their own rules
    assert not missing, f"declare the allowed range (opt(..., ge=/gt=/le=/lt=)) of: {', '.join(missing)}"


def test_check_config_catches_values_set_in_code():
    from synthtune.config import check_config

    with pytest.raises(ConfigError, match=r"SynthConfig.top_p: top_p=0.0 is out of range"):
        check_config(SynthConfig(top_p=0.0))


def test_module_doctests():
    import doctest

    import synthtune.config
    import synthtune.redact

    for module in (synthtune.config, synthtune.redact):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_unreadable_config_files_fail_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"model: tiny-llama\nout: caf\xe9\n")  # Latin-1, not UTF-8
    assert _error(DemoConfig, p) == f"{p}:2: not UTF-8 text (byte 26); save the file as UTF-8"
    assert _error(DemoConfig, tmp_path) == f"config file {tmp_path} is a directory"


def test_deeply_nested_values_are_config_errors_not_recursion_errors(tmp_path):
    deep = "[" * 1000 + "]" * 1000  # PyYAML spends ~3 frames per level: past the recursion limit
    msg = _error(SynthConfig, overrides=[f"stop={deep}"])
    assert ": stop: '[[[" in msg and "is nested too deeply" in msg
    assert load_config(SynthConfig, None, ["model=" + "[" * 1000]).model == "[" * 1000  # a str field: the text
    p = tmp_path / "c.yaml"
    p.write_text(f"stop: {deep}\n")
    assert _error(SynthConfig, p) == f"{p}: nested too deeply to be a config (values are scalars or flat lists)"
