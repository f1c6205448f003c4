"""selm_mcore.cli in this process: every subcommand and worker kind resolves to a module with the
entry points the CLI calls, and ``selm _worker KIND SPEC`` reaches the module's worker_main."""

import importlib
import json

import pytest

from selm_mcore import cli


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommands_resolve_to_modules_with_arguments_and_main(name, capsys):
    module = importlib.import_module(cli.SUBCOMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.main)
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--help"])
    assert info.value.code == 0 and f"usage: selm {name}" in capsys.readouterr().out


@pytest.mark.parametrize("kind", sorted(cli.WORKERS))
def test_worker_kinds_resolve_to_worker_main(kind):
    assert callable(importlib.import_module(cli.WORKERS[kind]).worker_main)


def test_worker_entry_reads_the_spec_and_calls_worker_main(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"job": "defragment"}))
    with pytest.raises(ValueError, match="unknown conversion job 'defragment'"):
        cli.main(["_worker", "convert", str(spec)])
    with pytest.raises(SystemExit, match=r"usage: selm _worker \{engine,convert,rank\} SPEC.json"):
        cli.main(["_worker", "rank-worker", str(spec)])
    with pytest.raises(SystemExit, match="usage: selm _worker"):
        cli.main(["_worker", "convert"])


def test_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["rank-worker"])
    assert info.value.code == 2 and "invalid choice: 'rank-worker'" in capsys.readouterr().err
