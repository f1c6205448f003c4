"""Bounded work for any input, through the commands a user runs: a YAML alias bomb, a huge value
in a config error, JSON rows no parser reads (a 5000-digit integer, 200k-deep nesting), a chat
template with loops inside loops. Each stops with one line naming the file (and row), in the
time and memory of a normal start, instead of a traceback, gigabytes or a hang.

The YAML bomb runs `selm run` in a child process with its address space capped
(``child_env.run_selm_limited``): without the bound it would allocate until it is stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from child_env import run_selm_limited

from selm_mcore import cli


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to width**levels strings."""
    anchors = "abcdefghijklmnop"
    parts = ["&a [" + ",".join(['"lol"'] * width) + "]"]
    for prev, name in zip(anchors, anchors[1:levels]):
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * width) + "]")
    return "data:\n  max_length: [" + ", ".join(parts) + "]\n"


def test_a_yaml_alias_bomb_in_a_typed_key_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 450  # 9**9 = 387 million strings once expanded
    result = run_selm_limited("run", str(bomb), memory_bytes=2 << 30, timeout_s=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"selm run: error: {bomb}: the YAML's aliases (*name) expand to more than 100000 "
        "values (an alias bomb?); write the values out instead of nesting aliases",
        result.stderr.strip().splitlines()[-1],  # the run's hint line
    ]


def test_a_bomb_in_set_and_an_alias_that_contains_itself_are_refused(tmp_path, capsys):
    plain = tmp_path / "plain.yaml"
    plain.write_text("loss:\n  beta: 0.1\n")
    bomb = alias_bomb().split("max_length: ", 1)[1].strip()
    result = run_selm_limited(
        "run", str(plain), "--set", f"data.max_length={bomb}", memory_bytes=2 << 30, timeout_s=120
    )
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith("selm run: error: --set data.max_length=[&a [") and len(line) < 400
    assert "expand to more than 100000 values (an alias bomb?)" in line
    looped = tmp_path / "looped.yaml"
    looped.write_text("optim:\n  lr_per_round: &a [1.0, *a]\n")
    assert cli.main(["run", str(looped)]) == 1
    assert capsys.readouterr().err.startswith(
        f"selm run: error: {looped}: a YAML alias refers to the value that contains it"
    )


def test_a_config_error_shows_a_huge_value_cut_short(tmp_path, capsys):
    """A 1 MB value and a 2000-item list in a typed key: the message shows a few characters
    of each (the bounded repr), one short line."""
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  dtype: {'x' * 1_000_000}\n")
    assert cli.main(["run", str(config)]) == 1
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith(f"selm run: error: {config}: model.dtype='xxx") and len(line) < 300
    config.write_text("data:\n  max_length: [" + ", ".join(["[1, 2, 3]"] * 2000) + "]\n")
    assert cli.main(["run", str(config)]) == 1
    line = capsys.readouterr().err.splitlines()[0]
    assert "data.max_length=[[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], ...] must be" in line
    assert len(line) < 300


def _train_config(write_config, tmp_path, model, rows, **data) -> Path:
    return write_config(
        tmp_path / "train.yaml",
        model={"hf_dir": str(model)},
        data={"train_path": str(rows), "max_length": 64, "max_prompt_length": 32, **data},
        loss={"alpha": 0.0},
        train={
            "global_batch_size": 2,
            "output_dir": str(tmp_path / "out"),
            "ref_cache": str(tmp_path / "no_cache.safetensors"),
            "tensorboard": False,
        },
    )


def test_json_rows_no_parser_reads_are_bad_rows_named_or_skipped(
    tmp_path, tiny_llama_dir, write_config, preference_row, capsys, caplog
):
    """A 5000-digit integer and 200k-deep nesting, each in a column the rows do not use:
    `selm train` names the row (one line), or skips both with data.skip_bad_rows=true and goes
    on (to the missing reference cache, here)."""
    good = json.dumps(preference_row("What is 2 plus 3?", "It is 5.", "It is 6."))
    lines = [
        good,
        good[:-1] + ', "score": ' + "7" * 5000 + "}",
        good[:-1] + ', "meta": ' + "[" * 200_000 + "]" * 200_000 + "}",
        json.dumps(preference_row("Tell me a story.", "Once there was a boy.", "No.")),
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    config = _train_config(write_config, tmp_path, tiny_llama_dir, rows)
    assert cli.main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"selm train: error: {rows} row 2: the JSON holds a value that cannot be read (an "
        "integer of more than 4300 digits). Fix: write such a number as a string, or drop "
        "that value"
    ]
    config = _train_config(write_config, tmp_path, tiny_llama_dir, rows, skip_bad_rows=True)
    caplog.set_level("WARNING")
    assert cli.main(["train", str(config)]) == 1
    assert "no_cache.safetensors" in capsys.readouterr().err  # got past the rows
    assert f"{rows}: skipped 2 of 4 rows (data.skip_bad_rows=true)" in caplog.text
    assert f"{rows} row 3: the JSON is nested too deeply to read" in caplog.text


def test_a_chat_template_with_loops_inside_loops_is_stopped_naming_its_file(
    tmp_path, tiny_llama_dir, write_config, preference_row, write_jsonl, capsys
):
    """Each range within jinja's limit, 10^10 steps together: tokenising stops after the
    template budget (2 s) naming the file that holds the template."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    template = model / "chat_template.jinja"
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    template.write_text(loops + template.read_text())
    rows = write_jsonl(tmp_path / "rows.jsonl", [preference_row("Q?", "A.", "B.")] * 2)
    config = _train_config(write_config, tmp_path, model, rows)
    assert cli.main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"selm train: error: {template}: rendering the chat template for one conversation "
        "(1 messages, 2 characters) took more than 2 s (loops inside loops?)"
    ), err
