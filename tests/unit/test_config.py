"""selm_mcore.config: unknown keys, wrong types, override parsing, section validation."""

from __future__ import annotations

import pytest

from selm_mcore.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    SelmConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
)


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
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key data\.max_lenght; known: "
                                          r"train_path, .*max_length"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown section 'dataa'; known: model, parallel"):
        load_config(write(tmp_path, "dataa: {}\n"))
    with pytest.raises(ConfigError, match=r"unknown key loss\.gamma"):
        load_config(None, ["loss.gamma=1"])


@pytest.mark.parametrize("text,message", [
    ("data:\n  max_length: '1024'\n", "data.max_length='1024' must be of type int, got str"),
    ("data:\n  max_length: 10.5\n", "data.max_length=10.5 must be of type int, got float"),
    ("data:\n  skip_bad_rows: 1\n", "data.skip_bad_rows=1 must be of type bool, got int"),
    ("data:\n  max_length: true\n", "data.max_length=True must be of type int, got bool"),
    ("optim:\n  lr: fast\n", "optim.lr='fast' must be of type float, got str"),
    ("optim:\n  lr_per_round: 5.0e-7\n", "optim.lr_per_round=5e-07 must be a list"),
    ("optim:\n  lr_per_round: [1.0e-7, x]\n", r"optim.lr_per_round\[1\]='x' must be of type "
                                              "float"),
    ("parallel:\n  vpp: 2.0\n", "parallel.vpp=2.0 must be of type int"),
    ("data: [1, 2]\n", "section 'data' must be a mapping"),
    ("- data\n", "the top level must be a mapping of sections, got list"),
])
def test_wrong_types_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text))


def test_numbers_are_coerced_where_safe(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n  min_lr: 5e-8\n"
                                      "  lr_per_round: [5e-7, 1]\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 5e-8  # YAML reads 5e-8 (no dot) as a string
    assert cfg.optim.lr_per_round == [5e-7, 1.0]


def test_overrides_parse_as_yaml_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "data:\n  max_length: 512\n  max_prompt_length: 256\ntrain:\n"
                           "  global_batch_size: 8\n")
    cfg = load_config(path, ["data.max_length=2048", "optim.lr=3e-7", "parallel.vpp=null",
                             "optim.lr_per_round=[5e-7, 3e-7, 1e-7]", "data.skip_bad_rows=true",
                             "train.output_dir=runs/a=b", "loss.alpha=0"])
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


@pytest.mark.parametrize("override,message", [
    ("optim", "expected section.key=value"),
    ("lr=3", "expected section.key=value"),
    ("data.max_length=[1", "the value is not valid YAML"),
    ("data.max_length=abc", "data.max_length='abc' must be of type int"),
    ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
])
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_override_into_a_non_mapping_section():
    with pytest.raises(ConfigError, match="section 'data' is not a mapping"):
        apply_overrides({"data": [1]}, ["data.max_length=3"])


@pytest.mark.parametrize("override,message", [
    ("data.max_prompt_length=1024", "data.max_prompt_length=1024 must be < data.max_length=1024"),
    ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of=0 must be >= 1"),
    ("data.max_length=0", "data.max_length=0 must be >= 1"),
    ("loss.loss_type=hinge", "loss.loss_type='hinge' is not one of sigmoid, ipo"),
    ("loss.beta=0", "loss.beta=0.0 must be > 0"),
    ("loss.alpha=-1e-4", "loss.alpha=-0.0001 must be >= 0"),
    ("loss.sft_weight=-1", "loss.sft_weight=-1.0 must be >= 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be >= 1"),
    ("train.global_batch_size=6", "train.global_batch_size=6 must be a multiple of "
                                  "train.micro_batch_size=4"),
])
def test_section_validation(override, message):
    overrides = ["train.micro_batch_size=4"] if "global_batch_size" in override else []
    with pytest.raises(ConfigError, match=f"<defaults>: {message}"):
        load_config(None, overrides + [override])


def test_data_seq_length():
    assert DataConfig().seq_length() is None
    assert DataConfig(pad_to_max_length=True).seq_length() == 1024
    assert DataConfig(max_length=1000, pad_to_max_length=True).seq_length() == 1024
    assert DataConfig(max_length=100, pad_to_max_length=True, pad_to_multiple_of=1
                      ).seq_length() == 100


def test_lr_for_round():
    optim = OptimConfig(lr=1.0, lr_per_round=[5e-7, 3e-7])
    assert [optim.lr_for_round(r) for r in (1, 2, 3)] == [5e-7, 3e-7, 3e-7]
    assert OptimConfig(lr=2.0).lr_for_round(4) == 2.0
    with pytest.raises(ValueError, match="round_index=0 must be >= 1"):
        optim.lr_for_round(0)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["data.max_length=2048", "optim.lr_per_round=[5e-7]",
                             "parallel.vpp=2", "parallel.pp=2"])
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
    packed = load_config(None, ["parallel.tp=2", "train.global_batch_size=8",
                                "train.micro_batch_size=4"])
    assert packed.data.packing == "shared_prompt"
    assert packed.validate(world_size=4) is packed  # packed: only dp must divide the batch
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 must be a multiple of the "
                                          r"data-parallel size 3 \(= 6 processes"):
        packed.validate(world_size=6)
    cfg = load_config(None, ["parallel.tp=2", "train.global_batch_size=8",
                             "train.micro_batch_size=2", "data.packing=none"])
    assert cfg.validate(world_size=4) is cfg  # dp 2 x micro 2 divides 8
    with pytest.raises(ConfigError, match=r"3 processes must be a multiple of parallel.tp \* "
                                          r"parallel.pp = 2"):
        cfg.validate(world_size=3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 must be a multiple of the "
                                          r"data-parallel size 3 .* train.micro_batch_size=2"):
        cfg.validate(world_size=6)


def test_packing_keys_are_validated():
    assert load_config(None).data.packing == "shared_prompt"  # the fastest correct layout
    with pytest.raises(ConfigError, match=r"data.packing='padded' is not one of shared_prompt, "
                                          r"pack, none"):
        load_config(None, ["data.packing=padded"])
    with pytest.raises(ConfigError, match=r"data.pack_tokens=-1 must be >= 0 \(0 = automatic\)"):
        load_config(None, ["data.pack_tokens=-1"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path,
                 "data:\n  max_length: 10\n  max_prompt_length: [1, 2\nloss:\n  beta: 1\n")
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


@pytest.mark.parametrize("override,message", [
    ("data.foo=1", r"--set data.foo=1: unknown key data.foo; known: data.train_path, "),
    ("dta.max_length=1", r"--set dta.max_length=1: unknown section 'dta'; known: model, "),
    ("data.max_length=abc", r"--set data.max_length=abc: data.max_length='abc' must be of type "
                            r"int"),
])
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
