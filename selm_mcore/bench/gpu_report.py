"""The report of tools/gpu_check.sh: one JSON and one markdown table from the parts it ran.

    python -P -m selm_mcore.bench.gpu_report env WORK/env.json     # what this machine has
    python -P -m selm_mcore.bench.gpu_report report WORK OUT       # OUT/gpu_check.{json,md}

WORK holds the parts' outputs: ``env.json``, ``status.tsv`` (part, exit status, seconds, note;
one line per part), ``pytest.xml`` (JUnit of ``pytest -m gpu``), ``kernels.json``
(``selm_mcore.kernels.bench_logprobs --json``), ``train_*.json`` (``selm bench plan-check``) and
``logprob.json`` (``selm bench logprob-path``), ``generation.json`` (``selm bench generation``,
only with vLLM), ``attention.json`` (``selm bench attention``), ``host_syncs.json`` (``selm bench
host-syncs``) and ``ranker.json`` (``selm bench ranker``). A part that did not run or failed
appears with its status and note; the report never fails because a part is missing.

    python -P -m selm_mcore.bench.gpu_report probe MODULE...       # exit 0 when all import
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

OPTIONAL = ("megatron", "transformer_engine", "flash_attn", "vllm", "triton")
# What the parts import (tools/gpu_check.sh names the parts that need each), probed by importing
# them for real: a package that is installed but does not import counts as missing.
PROBED = (
    "torch",
    "triton",
    "numpy",
    "yaml",
    "pytest",
    "transformers",
    "safetensors",
    "megatron.core",
    "llm_blender",
    "vllm",
    "transformer_engine",
    "flash_attn",
)


def probe_import(module: str) -> str:
    """ "" when ``module`` imports here, else why not (one line); llm_blender is imported with
    the project's compatibility fixes, as the ranker imports it."""
    import importlib

    try:
        if module == "llm_blender":
            from selm_mcore.rollout.rankers import import_llm_blender

            import_llm_blender()
        else:
            importlib.import_module(module)
    except Exception as exc:  # an import can fail in any way (a missing .so, a CUDA check)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return ""


def probe_all(modules: tuple[str, ...] = PROBED) -> dict[str, str]:
    """{module: why it does not import, "" when it does} (``gpu_report env`` runs in a process
    of its own, so the imports stay there)."""
    return {module: probe_import(module) for module in modules}


def environment() -> dict[str, Any]:
    """Versions, and which packages import here (``probe_all``)."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30)
    for name in OPTIONAL:  # top-level names only: finding a submodule imports its package
        env[f"has_{name}"] = importlib.util.find_spec(name) is not None
    if env["has_triton"]:
        import triton

        env["triton"] = triton.__version__
    env["import_errors"] = probe_all()
    env["importable"] = {m: not why for m, why in env["import_errors"].items()}
    return env


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def read_status(work: Path) -> list[dict[str, Any]]:
    parts = []
    path = work / "status.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, code, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        parts.append(
            {
                "part": name,
                "exit_status": int(code) if code.lstrip("-").isdigit() else None,
                "seconds": float(seconds or 0),
                "note": note,
            }
        )
    return parts


def read_pytest(path: Path) -> dict[str, Any] | None:
    """Counts and the failed / skipped tests of a JUnit file."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (failure.get("message") or "")[:300]})
        elif skipped is not None:
            out["skipped"] += 1
            out["skips"].append({"test": name, "reason": (skipped.get("message") or "")[:200]})
        else:
            out["passed"] += 1
    return out


def collect(work: Path) -> dict[str, Any]:
    return {
        "env": _load(work / "env.json"),
        "parts": read_status(work),
        "pytest": read_pytest(work / "pytest.xml"),
        "kernels": _load(work / "kernels.json"),
        "train": [_load(p) for p in sorted(work.glob("train_*.json"))],
        "logprob_path": _load(work / "logprob.json"),
        "generation": _load(work / "generation.json"),
        "attention": _load(work / "attention.json"),
        "host_syncs": _load(work / "host_syncs.json"),
        "ranker": _load(work / "ranker.json"),
    }


# --- markdown ----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _kernel_lines(kernels: dict[str, Any]) -> list[str]:
    lines = [
        f"Label log-probs from bf16 logits [N, V] ({kernels['machine']}); floor = read the "
        "logits once (forward), twice plus the gradient write (forward+backward), at the "
        f"measured copy bandwidth {kernels['copy_bw_gbs']:.0f} GB/s; V = 64,128 is one rank "
        "of TP2 at Llama-3's vocabulary.",
        "",
    ]
    rows = [
        [
            r["vocab"],
            r["tokens"],
            r["method"],
            f"{r['fwd_ms']:.2f}",
            f"{r['x_floor_fwd']:.1f}x",
            f"{r['fwd_bwd_ms']:.2f}",
            f"{r['x_floor_fwd_bwd']:.1f}x",
            f"{r['pct_bw_fwd_bwd']:.0f}%",
            f"{r['peak_extra_fwd_bwd_mb']:.0f}",
            f"{r['max_abs_diff_vs_naive']:.1e}",
        ]
        for r in kernels["rows"]
    ]
    return lines + _table(
        [
            "V",
            "tokens",
            "method",
            "fwd ms",
            "x floor",
            "fwd+bwd ms",
            "x floor",
            "% copy bw",
            "peak extra MiB",
            "max diff",
        ],
        rows,
    )


def _train_lines(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for result in results:
        rank = result["ranks"][0]
        meas, pred = rank["measured"], rank["predicted"]
        mib = 2**20
        measured_peak = meas.get("peak")
        rows.append(
            [
                result["model"],
                result["recompute"],
                result["impl"],
                f"{rank['geometry']['row_length']} ({rank['micro_batches']} mb)",
                "/".join(f"{meas[k] / pred[k]:.3f}" for k in ("params", "grads", "optimizer")),
                f"{meas['activations'] / mib:,.1f} / {pred['activations'] / mib:,.1f}",
                f"{measured_peak / mib:,.0f}" if measured_peak else "-",
                f"{pred['peak'] / mib:,.0f}",
                f"{rank['step_time_s']:.3f}",
                f"{rank['tokens_per_s']:.0f}",
                f"{rank['mfu']:.3f}",
            ]
        )
    return _table(
        [
            "model",
            "recompute",
            "planner impl",
            "tokens/micro-batch",
            "params/grads/optim measured/planned",
            "activations MiB meas / plan",
            "peak MiB measured",
            "peak MiB planned",
            "step s",
            "tokens/s",
            "MFU",
        ],
        rows,
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def rows_table(result: dict[str, Any]) -> list[str]:
    """Any benchmark JSON with a list of ``rows`` (dicts) as a markdown table of their keys."""
    rows = [r for r in result.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return [str(result.get("skipped") or result.get("note") or "no rows")]
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    return _table(keys, [[_cell(r.get(k, "")) for k in keys] for r in rows])


EXTRA_SECTIONS = (
    ("attention", "Packed attention: varlen vs the dense masked reference (bf16)"),
    ("host_syncs", "Host syncs per training step"),
    ("ranker", "Ranker throughput (PairRM-shaped, random weights)"),
)


def _extra_sections(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, title in EXTRA_SECTIONS:
        result = report.get(key)
        if not result:
            continue
        lines += ["", f"## {title}", ""]
        if key == "ranker":
            lines += [
                f"{result['shape']}, {result['dtype']} on {result['device']}: prompt "
                f"~{result['source_tokens']} + 3 candidates ~{result['candidate_tokens']} tokens, "
                f"6 ordered pairs per prompt; MFU of {result['peak_source']}",
                "",
            ]
        lines += rows_table(result)
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["env"] or {}
    lines = [
        f"# GPU check: {env.get('gpu', 'no GPU')}",
        "",
        f"python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"triton {env.get('triton', '-')}; importable: "
        + ", ".join(
            f"{k[4:]} {'yes' if v else 'no'}" for k, v in env.items() if k.startswith("has_")
        ),
        "",
        "## Parts",
        "",
    ]
    lines += _table(
        ["part", "exit status", "seconds", "note"],
        [[p["part"], p["exit_status"], f"{p['seconds']:.0f}", p["note"]] for p in report["parts"]],
    )
    tests = report["pytest"]
    if tests:
        lines += [
            "",
            "## GPU tests (pytest -m gpu)",
            "",
            f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped",
        ]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"]]
        lines += [f"- skipped {s['test']}: {s['reason']}" for s in tests["skips"]]
    if report["kernels"]:
        lines += ["", "## Log-prob kernel", ""] + _kernel_lines(report["kernels"])
    trains = [t for t in report["train"] if t and t.get("ranks")]
    if trains:
        lines += [
            "",
            "## Training steps: planner vs measured",
            "",
            "The trainer's step on a shape-only random model (`selm bench plan-check`); "
            "peak measured = CUDA max allocated; activations = bytes saved for backward "
            "(torch saved-tensor hooks).",
            "",
        ] + _train_lines(trains)
    logprob = report["logprob_path"]
    if logprob:
        lines += [
            "",
            f"## Log-prob path in a training step ({logprob['shape']}, {logprob['dtype']})",
            "",
        ]
        lines += _table(
            ["path", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"],
            [
                [
                    r["path"],
                    f"{r['step_time_s']:.3f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['tflops']:.1f}",
                    f"{r['mfu']:.3f}",
                    f"{r['peak_memory_gib']:.2f}",
                ]
                for r in logprob["rows"]
            ],
        )
    lines += _extra_sections(report)
    generation = report.get("generation")
    if generation:
        lines += [
            "",
            "## vLLM generation (tiny model)",
            "",
            f"{generation['generated_tokens']} tokens for {generation['num_prompts']} "
            f"prompts in {generation['seconds']:.2f} s ({generation['tokens_per_s']:.0f} "
            f"tokens/s), engine start {generation['engine_start_s']:.1f} s",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from selm_mcore.runtime.files import write_json_atomic, write_text_atomic

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "probe":
        errors = {m: why for m, why in probe_all(tuple(argv[1:])).items() if why}
        for module, why in errors.items():
            print(f"{module}: {why}")
        return 1 if errors else 0
    if len(argv) == 2 and argv[0] == "env":
        write_json_atomic(argv[1], environment())
        return 0
    if len(argv) == 3 and argv[0] == "report":
        work, out = Path(argv[1]), Path(argv[2])
        report = collect(work)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "gpu_check.json", report)
        write_text_atomic(out / "gpu_check.md", markdown(report))
        print(markdown(report))
        return 0
    sys.exit(
        "usage: python -m selm_mcore.bench.gpu_report env FILE | report WORKDIR OUTDIR | "
        "probe MODULE..."
    )


if __name__ == "__main__":
    sys.exit(main())
