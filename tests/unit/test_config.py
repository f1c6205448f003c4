"""selm_mcore.config.schema: unknown keys, wrong types, override parsing, section validation."""

from __future__ import annotations

import pytest

from selm_mcore.config.io import apply_overrides, from_dict, load_config, save_config
from selm_mcore.config.schema import ConfigError, DataConfig, OptimConfig, SelmConfig


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_match_the_reference_recipe():
    cfg = load_config(None)
    assert isinstance(cfg, SelmConfig)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert (cfg.loss.beta, cfg.loss.loss_type) == (0.01, "sigmoid")


def test_unknown_section_and_key_name_the_source_and_list_known(tmp_path):
    path = write(tmp_path, "data:\n  max_lenght: 10\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml: unknown key data\.max_lenght; known: "
        r"train_path, .*max_length",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown section 'dataa'; known: model, parallel"):
        load_config(write(tmp_path, "dataa: {}\n"))
    with pytest.raises(ConfigError, match=r"unknown key loss\.gamma"):
        load_config(None, ["loss.gamma=1"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("data:\n  max_length: '1024'\n", "data.max_length='1024' must be of type int, got str"),
        ("data:\n  max_length: 10.5\n", "data.max_length=10.5 must be of type int, got float"),
        ("data:\n  skip_bad_rows: 1\n", "data.skip_bad_rows=1 must be of type bool, got int"),
        ("data:\n  max_length: true\n", "data.max_length=True must be of type int, got bool"),
        ("optim:\n  lr: fast\n", "optim.lr='fast' must be of type float, got str"),
        ("optim:\n  lr_per_round: 5.0e-7\n", "optim.lr_per_round=5e-07 must be a list"),
        (
            "optim:\n  lr_per_round: [1.0e-7, x]\n",
            r"optim.lr_per_round\[1\]='x' must be of type "
            "float",
        ),
        ("parallel:\n  vpp: 2.0\n", "parallel.vpp=2.0 must be of type int"),
        ("data: [1, 2]\n", "section 'data' must be a mapping"),
        ("- data\n", "the top level must be a mapping of sections, got list"),
    ],
)
def test_wrong_types_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text))


def test_numbers_are_coerced_where_safe(tmp_path):
    cfg = load_config(
        write(tmp_path, "optim:\n  lr: 1\n  min_lr: 5e-8\n  lr_per_round: [5e-7, 1]\n")
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 5e-8  # YAML reads 5e-8 (no dot) as a string
    assert cfg.optim.lr_per_round == [5e-7, 1.0]


def test_overrides_parse_as_yaml_and_win_over_the_file(tmp_path):
    path = write(
        tmp_path,
        "data:\n  max_length: 512\n  max_prompt_length: 256\ntrain:\n  global_batch_size: 8\n",
    )
    cfg = load_config(
        path,
        [
            "data.max_length=2048",
            "optim.lr=3e-7",
            "parallel.vpp=null",
            "optim.lr_per_round=[5e-7, 3e-7, 1e-7]",
            "data.skip_bad_rows=true",
            "train.output_dir=runs/a=b",
            "loss.alpha=0",
        ],
    )
    assert cfg.data.max_length == 2048 and cfg.data.max_prompt_length == 256
    assert cfg.optim.lr == 3e-7 and cfg.parallel.vpp is None
    assert cfg.optim.lr_per_round == [5e-7, 3e-7, 1e-7]
    assert cfg.data.skip_bad_rows is True
    assert cfg.train.output_dir == "runs/a=b"  # only the first '=' splits
    assert cfg.loss.alpha == 0.0 and cfg.train.global_batch_size == 8
    # a later override of the same key wins
    assert load_config(None, ["optim.lr=1e-6", "optim.lr=2e-6"]).optim.lr == 2e-6


def test_string_fields_keep_the_text_as_typed():
    cfg = load_config(None, ["model.hf_dir=2024", "train.output_dir=007", "data.train_path="])
    assert cfg.model.hf_dir == "2024" and cfg.train.output_dir == "007"
    assert cfg.data.train_path == ""


def test_override_into_an_empty_yaml_section(tmp_path):
    path = write(tmp_path, "data:\nloss:\n  beta: 0.1\n")
    assert load_config(path).data == DataConfig()
    cfg = load_config(path, ["data.max_length=2048"])
    assert cfg.data.max_length == 2048 and cfg.loss.beta == 0.1


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim", "expected section.key=value"),
        ("lr=3", "expected section.key=value"),
        ("data.max_length=[1", "the value is not valid YAML"),
        ("data.max_length=abc", "data.max_length='abc' must be of type int"),
        ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
    ],
)
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_override_into_a_non_mapping_section():
    with pytest.raises(ConfigError, match="section 'data' is not a mapping"):
        apply_overrides({"data": [1]}, ["data.max_length=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data.max_prompt_length=1024",
            "data.max_prompt_length=1024 must be < data.max_length=1024",
        ),
        ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of=0 must be >= 1"),
        ("data.max_length=0", "data.max_length=0 must be >= 1"),
        ("loss.loss_type=hinge", "loss.loss_type='hinge' is not one of sigmoid, ipo"),
        ("loss.beta=0", "loss.beta=0.0 must be a finite number > 0"),
        ("loss.alpha=-1e-4", "loss.alpha=-0.0001 must be a finite number >= 0"),
        ("loss.sft_weight=-1", "loss.sft_weight=-1.0 must be a finite number >= 0"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0 must be >= 1"),
        (
            "train.global_batch_size=6",
            "train.global_batch_size=6 must be a multiple of train.micro_batch_size=4",
        ),
    ],
)
def test_section_validation(override, message):
    overrides = ["train.micro_batch_size=4"] if "global_batch_size" in override else []
    with pytest.raises(ConfigError, match=f"<defaults>: {message}"):
        load_config(None, overrides + [override])


def test_data_seq_length():
    assert DataConfig().seq_length() is None
    assert DataConfig(pad_to_max_length=True).seq_length() == 1024
    assert DataConfig(max_length=1000, pad_to_max_length=True).seq_length() == 1024
    assert (
        DataConfig(max_length=100, pad_to_max_length=True, pad_to_multiple_of=1).seq_length() == 100
    )


def test_lr_for_round():
    optim = OptimConfig(lr=1.0, lr_per_round=[5e-7, 3e-7])
    assert [optim.lr_for_round(r) for r in (1, 2, 3)] == [5e-7, 3e-7, 3e-7]
    assert OptimConfig(lr=2.0).lr_for_round(4) == 2.0
    with pytest.raises(ValueError, match="round_index=0 must be >= 1"):
        optim.lr_for_round(0)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["data.max_length=2048", "optim.lr_per_round=[5e-7]", "parallel.vpp=2", "parallel.pp=2"],
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert from_dict(cfg.to_dict()) == cfg


def test_missing_file():
    with pytest.raises(ConfigError, match="config file /nonexistent.yaml does not exist"):
        load_config("/nonexistent.yaml")


def test_start_model_prefers_init_from_and_refuses_missing_folders(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "ckpt").mkdir()
    cfg = load_config(None, [f"model.hf_dir={tmp_path / 'hf'}"])
    assert cfg.start_model() == tmp_path / "hf"
    cfg.train.init_from = str(tmp_path / "ckpt")  # round t > 1: the previous round's policy
    assert cfg.start_model() == tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="no model to start from: set train.init_from"):
        load_config(None).start_model()
    cfg.train.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"missing is not a folder"):
        cfg.start_model()


def test_ref_cache_path_defaults_into_the_output_dir(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'out'}"])
    assert cfg.train.ref_cache_path() == tmp_path / "out" / "ref_logps.safetensors"
    cfg.train.ref_cache = str(tmp_path / "cache.safetensors")
    assert cfg.train.ref_cache_path() == tmp_path / "cache.safetensors"


def test_validate_with_a_world_size_checks_the_data_parallel_split():
    packed = load_config(
        None, ["parallel.tp=2", "train.global_batch_size=8", "train.micro_batch_size=4"]
    )
    assert packed.data.packing == "shared_prompt"
    assert packed.validate(world_size=4) is packed  # packed: only dp must divide the batch
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=8 must be a multiple of the "
        r"data-parallel size 3 \(= 6 processes",
    ):
        packed.validate(world_size=6)
    cfg = load_config(
        None,
        [
            "parallel.tp=2",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "data.packing=none",
        ],
    )
    assert cfg.validate(world_size=4) is cfg  # dp 2 x micro 2 divides 8
    with pytest.raises(
        ConfigError,
        match=r"3 processes must be a multiple of parallel.tp \* "
        r"parallel.pp = 2",
    ):
        cfg.validate(world_size=3)
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=8 must be a multiple of the "
        r"data-parallel size 3 .* train.micro_batch_size=2",
    ):
        cfg.validate(world_size=6)


def test_packing_keys_are_validated():
    assert load_config(None).data.packing == "shared_prompt"  # the fastest correct layout
    with pytest.raises(
        ConfigError,
        match=r"data.packing='padded' is not one of shared_prompt, "
        r"pack, none",
    ):
        load_config(None, ["data.packing=padded"])
    with pytest.raises(ConfigError, match=r"data.pack_tokens=-1 must be >= 0 \(0 = automatic\)"):
        load_config(None, ["data.pack_tokens=-1"])


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", "full"),
        ("false", "none"),
        ("selective", "selective"),
        ("none", "none"),
        ("full", "full"),
    ],
)
def test_recompute_takes_a_choice_or_the_former_boolean(tmp_path, value, expected):
    assert (
        load_config(write(tmp_path, f"model:\n  recompute: {value}\n")).model.recompute == expected
    )
    assert load_config(None, [f"model.recompute={value}"]).model.recompute == expected


def test_recompute_refuses_other_values():
    with pytest.raises(
        ConfigError, match="model.recompute='partial' is not one of none, selective, full"
    ):
        load_config(None, ["model.recompute=partial"])


def test_sequence_parallel_choice():
    assert load_config(None, []).parallel.sequence_parallel == "auto"
    for value, expected in (("true", "true"), ("false", "false"), ("auto", "auto")):
        cfg = load_config(None, ["parallel.tp=2", f"parallel.sequence_parallel={value}"])
        assert cfg.parallel.sequence_parallel == expected
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tp > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="'always' is not one of auto, true, false"):
        load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=always"])


def test_example_configs_pick_a_recompute_choice():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "examples" / "configs"
    choices = {path.name: load_config(path).model.recompute for path in configs.glob("*.yaml")}
    assert choices["selm_llama3_8b.yaml"] == "none"  # 8B at TP2 fits without recompute
    assert set(choices.values()) <= {"none", "selective", "full"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.beta=.nan", "loss.beta=nan must be a finite number > 0"),
        ("loss.beta=nan", "loss.beta=nan must be a finite number > 0"),  # YAML text, as --set gives
        ("loss.beta=.inf", "loss.beta=inf must be a finite number > 0"),
        ("loss.alpha=.nan", "loss.alpha=nan must be a finite number >= 0"),
        ("loss.sft_weight=-.inf", "loss.sft_weight=-inf must be a finite number >= 0"),
        ("optim.lr=.inf", "optim.lr=inf must be a finite number >= 0"),
        ("optim.lr=-1e-7", "optim.lr=-1e-07 must be a finite number >= 0"),
        (
            "optim.lr_per_round=[1.0e-6, .nan]",
            r"optim.lr_per_round\[1\]=nan must be a finite number",
        ),
        ("optim.min_lr=.nan", "optim.min_lr=nan must be a finite number >= 0"),
        ("optim.min_lr=1e-6", r"optim.min_lr=1e-06 must be <= optim.lr=5e-07 \(the peak"),
        ("optim.adam_beta1=1", r"optim.adam_beta1=1.0 must be a finite number in \[0, 1\)"),
        ("optim.adam_beta2=.nan", r"optim.adam_beta2=nan must be a finite number in \[0, 1\)"),
        ("optim.adam_eps=0", "optim.adam_eps=0.0 must be a finite number > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be a finite number >= 0"),
        ("optim.warmup_ratio=1", r"optim.warmup_ratio=1.0 must be a finite number in \[0, 1\)"),
        ("optim.clip_grad=.nan", "optim.clip_grad=nan must be a finite number >= 0"),
        ("generation.temperature=.nan", "generation.temperature=nan must be a finite number >= 0"),
        ("generation.top_p=0", r"generation.top_p=0.0 must be a finite number in \(0, 1\]"),
        ("generation.gpu_memory_utilization=.inf", "generation.gpu_memory_utilization=inf must"),
        ("generation.reload_timeout_s=.nan", "generation.reload_timeout_s=nan must be a finite"),
    ],
)
def test_numbers_must_be_finite_and_in_range(override, message):
    with pytest.raises(ConfigError, match=f"<defaults>: {message}"):
        load_config(None, [override])


def test_min_lr_is_checked_against_every_round_lr():
    load_config(None, ["optim.lr_per_round=[1.0e-6, 1.0e-7]", "optim.min_lr=1e-7"])
    with pytest.raises(
        ConfigError,
        match=r"optim.min_lr=2e-07 must be <= every "
        r"optim.lr_per_round entry, the smallest=1e-07",
    ):
        load_config(None, ["optim.lr_per_round=[1.0e-6, 1.0e-7]", "optim.min_lr=2e-7"])


def test_every_float_field_is_checked_for_finiteness():
    """A float field without a range rule still refuses NaN (no field escapes the walk)."""
    import dataclasses
    import typing

    from selm_mcore.config.schema import NUMBER_RULES, SelmConfig

    cfg = SelmConfig()
    float_keys = [
        f"{s.name}.{name}"
        for s in dataclasses.fields(cfg)
        for name, kind in typing.get_type_hints(type(getattr(cfg, s.name))).items()
        if "float" in str(kind)
    ]
    assert set(NUMBER_RULES) <= set(float_keys)
    for key in float_keys:
        section, name = key.split(".")
        bad = SelmConfig()
        value = [float("nan")] if key == "optim.lr_per_round" else float("nan")
        setattr(getattr(bad, section), name, value)
        with pytest.raises(ConfigError, match=rf"{key}(\[0\])?=nan must be a finite number"):
            bad.validate()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(
        tmp_path, "data:\n  max_length: 10\n  max_prompt_length: [1, 2\nloss:\n  beta: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path} line ") and "YAML syntax error" in message
    # yaml itself locates an unclosed flow sequence at the first token it cannot take.
    import yaml

    try:
        yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        assert f"line {exc.problem_mark.line + 1} column {exc.problem_mark.column + 1}" in message


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.foo=1", r"--set data.foo=1: unknown key data.foo; known: data.train_path, "),
        ("dta.max_length=1", r"--set dta.max_length=1: unknown section 'dta'; known: model, "),
        (
            "data.max_length=abc",
            r"--set data.max_length=abc: data.max_length='abc' must be of type "
            r"int",
        ),
    ],
)
def test_override_errors_blame_the_override_not_the_file(tmp_path, override, message):
    path = write(tmp_path, "data:\n  max_length: 128\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, [override])
    assert str(path) not in str(info.value)


def test_max_row_bytes_is_validated():
    assert load_config(None).data.max_row_bytes == 1_000_000
    assert load_config(None, ["data.max_row_bytes=0"]).data.max_row_bytes == 0
    with pytest.raises(ConfigError, match="data.max_row_bytes=-1 must be >= 0"):
        load_config(None, ["data.max_row_bytes=-1"])
