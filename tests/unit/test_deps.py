"""Optional packages checked from the config before any phase runs (selm_mcore.runtime.deps): what
each setting needs, and one error naming every missing package with its pip extra. A package is made
missing the way Python itself reports one: ``sys.modules[name] = None``."""

from __future__ import annotations

import sys

import pytest

from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError
from selm_mcore.loop.online import check_run_inputs
from selm_mcore.runtime.deps import check_dependencies, requirements


def modules(cfg, phases=None) -> set[str]:
    reqs = requirements(cfg) if phases is None else requirements(cfg, phases)
    return {r.module for r in reqs}


def test_what_each_setting_needs():
    cfg = load_config(None, ["train.tensorboard=true", "ranking.kind=pairrm"])
    assert modules(cfg) == {"tensorboard", "vllm", "llm_blender", "matplotlib"}
    quiet = load_config(
        None, ["train.tensorboard=false", "ranking.kind=verifiable", "data.train_path=rows.parquet"]
    )
    assert modules(quiet) == {"vllm", "matplotlib", "pyarrow"}
    assert modules(cfg, ("train",)) == {"tensorboard"}


def test_selm_run_stops_before_any_phase_naming_the_extras(
    tmp_path, write_jsonl, preference_row, tiny_llama_dir, monkeypatch
):
    rows = write_jsonl(tmp_path / "rows.jsonl", [preference_row("p", "a", "b")] * 4)
    cfg = load_config(
        None,
        [
            f"model.hf_dir={tiny_llama_dir}",
            f"data.train_path={rows}",
            "train.global_batch_size=2",
            "train.tensorboard=true",
            "ranking.kind=pairrm",
        ],
    )
    check_run_inputs(cfg)  # everything installed here
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "llm_blender", None)
    with pytest.raises(ConfigError) as info:
        check_run_inputs(cfg)
    message = str(info.value)
    assert "2 optional package(s)" in message
    assert "tensorboard: needed by train.tensorboard=true" in message
    assert "selm-mcore[logging]" in message and "train.tensorboard=false" in message
    assert "llm_blender: needed by ranking.kind=pairrm" in message
    assert "llm-blender==0.0.2" in message and "selm-mcore[ranking]" in message
    # selm train checks only what training imports
    check_dependencies(load_config(None, ["train.tensorboard=false"]), phases=("train",))
