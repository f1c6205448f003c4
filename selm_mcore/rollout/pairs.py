"""New preference pairs from ranked candidates, held-out scores, and ``selm rank``.

SELM step 3 (see ``docs/architecture.md``): per prompt, rank ``[y_ref, y_w, y_l]`` (in this
order) against the raw prompt text; the best-ranked candidate becomes the new chosen, the
worst-ranked the new rejected, and ties go to the first index, so y_ref wins ties and a full tie
gives chosen == rejected (a zero DPO gradient). The original y_w can end up rejected. Prompt-only
rows rank their k generated samples instead. Generated responses are stripped of surrounding
whitespace before ranking and training, as the reference code does (``selm generate`` writes
them stripped already; generations from elsewhere are stripped here). Pairs with an empty
chosen, rejected or y_ref are dropped (and counted): the data schema refuses empty responses.

The held-out score of a policy is the ranker's score of its response to each held-out prompt
(pairwise rankers: against the row's chosen response).

    selm rank CONFIG --generations GEN.jsonl [--rows ROWS.jsonl --out PAIRS.jsonl]
                     [--eval-rows EVAL.jsonl --eval-out SCORES.jsonl] [--num-nodes N]

One ranker load per ranker process serves both jobs (the online loop's rank phase runs both);
ranking.num_workers processes per node, one per GPU by default, and one ``selm rank`` per node
across nodes (``selm_mcore.rollout.rank_workers``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.data.ids import prompt_key
from selm_mcore.data.rows import prompt_conversation, raw_prompt, strip_response
from selm_mcore.rollout.rankers import PairRMRanker, Ranker, ranks_from_scores
from selm_mcore.runtime.errors import InputError, short_repr
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.runtime.outputs import add_overwrite_argument, output_locks, refuse_finished
from selm_mcore.runtime.preflight import check_output_dir

logger = logging.getLogger(__name__)

PREFERENCE_CANDIDATES = ("y_ref", "y_w", "y_l")


# --- new preference pairs ---------------------------------------------------------------------


def _last_assistant(conversation: Any, key: str, where: str) -> str:
    if (
        not isinstance(conversation, list)
        or not conversation
        or conversation[-1].get("role") != "assistant"
    ):
        raise InputError(f"{where}: '{key}' must be a message list ending with an assistant turn")
    return conversation[-1]["content"]


def build_pairs(
    rows: Sequence[Mapping[str, Any]],
    y_refs: Mapping[str, Sequence[str] | str],
    ranker: Ranker,
    *,
    answer_key: str = "answer",
) -> tuple[list[dict], list[dict]]:
    """New preference rows from ranked candidates (SELM step 3).

    ``rows``: preference rows (UltraFeedback-binarized: prompt, prompt_id, chosen, rejected) or
    prompt-only rows (prompt_id + prompt or messages). ``y_refs``: prompt_id -> the policy's
    responses (``generate_file`` output; a str counts as one response).

    * Preference row: candidates [y_ref, y_w, y_l] with y_ref = responses[0] (every generated
      response stripped of surrounding whitespace, as the reference code).
    * Prompt-only row: candidates = all its responses (k >= 2); reference_response = the first.

    Ranked against the raw prompt text. chosen = the best rank, rejected = the worst rank, ties to
    the lowest index (so y_ref wins ties; a full tie gives chosen == rejected).

    Returns (new rows, per-row stats). New rows keep the schema: prompt, prompt_id, chosen,
    rejected, messages (= chosen), score_chosen, score_rejected (ranker scores) and
    reference_response (y_ref, whatever the ranker did with it); other input keys are kept.
    Stats: prompt_id, candidate names, scores, ranks, chosen/rejected index and name.
    """
    prepared = [_candidates(index, row, y_refs) for index, row in enumerate(rows)]
    groups: dict[int, list[int]] = {}  # candidates per row -> the rows ranked together
    for index, candidate in enumerate(prepared):
        groups.setdefault(len(candidate.texts), []).append(index)
    scores: list[np.ndarray] = [np.empty(0)] * len(prepared)
    for indices in groups.values():
        group_scores = ranker.scores(
            [prepared[i].prompt for i in indices],
            [prepared[i].texts for i in indices],
            answers=[prepared[i].row.get(answer_key) for i in indices],
        )
        for i, row_scores in zip(indices, group_scores):
            scores[i] = row_scores
    new_rows, stats = [], []
    for candidate, row_scores in zip(prepared, scores):
        new_row, stat = _ranked_pair(candidate, row_scores)
        new_rows.append(new_row)
        stats.append(stat)
    return new_rows, stats


@dataclass
class _Candidates:
    """One row's candidates for ranking: [y_ref, y_w, y_l], or a prompt-only row's samples."""

    row: Mapping[str, Any]
    messages: list[dict[str, str]]  # the prompt conversation
    prompt: str  # the raw prompt text the ranker sees
    texts: list[str]
    names: list[str]


def _candidates(
    index: int, row: Mapping[str, Any], y_refs: Mapping[str, Sequence[str] | str]
) -> _Candidates:
    prompt_id = prompt_key(row.get("prompt_id"), f"row {index}")
    where = f"row {index} (prompt_id={short_repr(prompt_id)})"
    if prompt_id not in y_refs:
        raise InputError(
            f"{where}: no generated response for this prompt_id in the "
            "generations; regenerate this round's responses"
        )
    generated = y_refs[prompt_id]
    responses = [
        strip_response(r) for r in ([generated] if isinstance(generated, str) else generated)
    ]
    if not responses:
        raise InputError(f"{where}: the generations hold no response")
    messages = prompt_conversation(row, where)
    if "chosen" in row or "rejected" in row:
        y_w = _last_assistant(row.get("chosen"), "chosen", where)
        y_l = _last_assistant(row.get("rejected"), "rejected", where)
        texts, names = [responses[0], y_w, y_l], list(PREFERENCE_CANDIDATES)
    else:
        if len(responses) < 2:
            raise InputError(
                f"{where}: a prompt-only row needs >= 2 generated responses to "
                f"form a pair, got {len(responses)}; set generation.n >= 2"
            )
        texts, names = responses, [f"sample_{k}" for k in range(len(responses))]
    return _Candidates(row, messages, raw_prompt(row, messages), texts, names)


def _ranked_pair(candidates: _Candidates, scores: np.ndarray) -> tuple[dict, dict]:
    """(the new preference row, its stats) from one row's candidate scores: best and worst
    rank, the first index winning ties."""
    row, texts, names = candidates.row, candidates.texts, candidates.names
    ranks = ranks_from_scores(scores[None])[0]
    best, worst = int(np.argmin(ranks)), int(np.argmax(ranks))  # first index wins ties
    chosen = candidates.messages + [{"role": "assistant", "content": texts[best]}]
    rejected = candidates.messages + [{"role": "assistant", "content": texts[worst]}]
    new_row = {k: v for k, v in row.items() if k != "responses"}
    new_row.update(
        prompt=candidates.prompt,
        prompt_id=prompt_key(row["prompt_id"], "row"),
        chosen=chosen,
        rejected=rejected,
        messages=chosen,
        score_chosen=float(scores[best]),
        score_rejected=float(scores[worst]),
        reference_response=texts[0],
    )
    stats = {
        "prompt_id": prompt_key(row["prompt_id"], "row"),
        "candidates": names,
        "scores": [float(s) for s in scores],
        "ranks": [int(r) for r in ranks],
        "chosen_index": best,
        "rejected_index": worst,
        "chosen": names[best],
        "rejected": names[worst],
        "tie": best == worst,
    }
    return new_row, stats


def summarize_stats(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for reports: how often each candidate was chosen / rejected, full ties, and the
    mean score of y_ref (the policy's greedy response)."""
    summary: dict[str, Any] = {"rows": len(stats), "ties": sum(bool(s["tie"]) for s in stats)}
    for s in stats:
        summary[f"chosen_{s['chosen']}"] = summary.get(f"chosen_{s['chosen']}", 0) + 1
        summary[f"rejected_{s['rejected']}"] = summary.get(f"rejected_{s['rejected']}", 0) + 1
    ref_scores = [s["scores"][0] for s in stats]
    summary["mean_score_first"] = float(np.mean(ref_scores)) if ref_scores else float("nan")
    return summary


def read_generations(path: str | os.PathLike) -> tuple[dict[str, list[str]], set[str]]:
    """``generate_file`` output -> ({prompt_id: responses}, the prompt_ids it skipped: rows with
    ``skipped``, data.special_tokens_in_text=skip); ids in their normalised form."""
    out: dict[str, list[str]] = {}
    skipped: set[str] = set()
    for row_number, row in read_records(path, with_row_numbers=True):
        where = f"{path} row {row_number}"
        if not isinstance(row.get("responses"), list):
            raise InputError(f"{where}: expected keys prompt_id and responses (list)")
        key = prompt_key(row.get("prompt_id"), where)
        if row.get("skipped"):
            skipped.add(key)
        else:
            out[key] = row["responses"]
    return out, skipped


def load_generations(path: str | os.PathLike) -> dict[str, list[str]]:
    """``generate_file`` output -> {prompt_id: responses} (prompts it skipped left out)."""
    return read_generations(path)[0]


# --- held-out scores ---------------------------------------------------------------------------

# Held-out prompts share the generation file with the round's prompts under this id prefix.
EVAL_ID_PREFIX = "eval::"


def eval_anchor(row: dict[str, Any]) -> str | None:
    """The reference response a pairwise ranker compares a held-out response against: the
    row's chosen response (UltraFeedback test_prefs rows have one), else None."""
    chosen = row.get("chosen")
    if isinstance(chosen, list) and chosen and chosen[-1].get("role") == "assistant":
        return chosen[-1]["content"]
    return None


def score_eval_responses(
    ranker,
    eval_rows: list[dict[str, Any]],
    generations: Mapping[str, Sequence[str] | str],
    answer_key: str,
) -> list[dict]:
    """The ranker's score of the policy's (first) response to each held-out prompt.

    Pairwise rankers (PairRM) score it against the row's chosen response (``eval_anchor``);
    the others score it alone. Returns rows {prompt_id, response, score}.
    """
    prompts, candidates, answers = [], [], []
    for index, row in enumerate(eval_rows):
        key = EVAL_ID_PREFIX + prompt_key(row.get("prompt_id"), f"held-out row {index}")
        if key not in generations:
            raise InputError(
                f"held-out prompt {short_repr(row['prompt_id'])} has no generated response"
            )
        response = strip_response(generations[key][0])
        prompts.append(raw_prompt(row, prompt_conversation(row, f"held-out prompt {key!r}")))
        if isinstance(ranker, PairRMRanker):
            anchor = eval_anchor(row)
            if anchor is None:
                raise InputError(
                    f"held-out prompt {row['prompt_id']!r} has no chosen response "
                    "to compare against (PairRM scores pairs)"
                )
            candidates.append([response, anchor])
        else:
            candidates.append([response])
        answers.append(row.get(answer_key))
    scores = ranker.scores(prompts, candidates, answers=answers) if prompts else []
    return [
        {
            "prompt_id": prompt_key(row["prompt_id"], "row"),
            "response": cands[0],
            "score": float(score[0]),
        }
        for row, cands, score in zip(eval_rows, candidates, scores)
    ]


def drop_empty_responses(pairs: list[dict], stats: list[dict]) -> list[dict]:
    """Pairs whose chosen, rejected and y_ref are all non-empty; marks the others in ``stats``.

    A policy may answer a prompt with EOS alone (an empty y_ref), and the ranker may then pick
    it; data.read_rows refuses empty responses (they usually mean broken data), so such rows
    leave this round's training data, with a warning and ``dropped_empty`` in the stats.
    """
    kept = []
    for pair, stat in zip(pairs, stats):
        texts = (
            pair["chosen"][-1]["content"],
            pair["rejected"][-1]["content"],
            pair["reference_response"],
        )
        stat["dropped_empty"] = not all(text.strip() for text in texts)
        if not stat["dropped_empty"]:
            kept.append(pair)
    if len(kept) < len(pairs):
        logger.warning(
            "dropped %d of %d new pairs with an empty chosen, rejected or y_ref "
            "response (the policy answered with EOS alone)",
            len(pairs) - len(kept),
            len(pairs),
        )
    return kept


def warn_repeated_prompt_ids(rows: Sequence[Mapping[str, Any]], path: str) -> int:
    """Log (and return) how many rows repeat an earlier row's prompt_id: such rows share one
    generated response (generations are keyed by prompt_id)."""
    seen: dict[str, int] = {}
    repeats = []
    for index, row in enumerate(rows, start=1):
        if row.get("prompt_id") is None:
            continue
        prompt_id = prompt_key(row["prompt_id"], f"{path} row {index}")
        if prompt_id in seen:
            repeats.append(
                f"row {index} repeats prompt_id {short_repr(prompt_id)} of row {seen[prompt_id]}"
            )
        else:
            seen[prompt_id] = index
    if repeats:
        logger.warning(
            "%s: %d rows repeat an earlier row's prompt_id and so share its generated "
            "response (e.g. %s); give each row its own prompt_id",
            path,
            len(repeats),
            "; ".join(repeats[:3]),
        )
    return len(repeats)


# --- CLI: selm rank ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--generations",
        required=True,
        help="JSONL written by `selm generate` (prompt_id, responses)",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="JSONL of this round's rows (preference or prompt-only) to pair",
    )
    parser.add_argument("--out", default=None, help="JSONL of new preference pairs (with --rows)")
    parser.add_argument(
        "--stats",
        default=None,
        help="JSONL of per-row ranking stats (default: OUT with .stats.jsonl)",
    )
    parser.add_argument(
        "--eval-rows",
        default=None,
        help="held-out rows to score (their responses are in --generations under "
        f"the prompt id prefixed with {EVAL_ID_PREFIX!r})",
    )
    parser.add_argument(
        "--eval-out", default=None, help="JSONL of held-out scores (prompt_id, response, score)"
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="rank this node's share of the rows over N nodes (one process per node, e.g. "
        "through srun); writes OUT.node<k>.jsonl for each output",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's rank (default: SLURM_NODEID / NODE_RANK / GROUP_RANK)",
    )
    add_overwrite_argument(parser, "the --out, --stats and --eval-out files")


def rank_job(
    ranker: Ranker,
    rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    generations: Mapping[str, Sequence[str] | str],
    answer_key: str,
) -> tuple[list[dict], list[dict], list[dict]]:
    """What one ranker load does for ``selm rank`` (or one of its worker processes): (the new
    pairs without the empty ones, every row's stats, the held-out scores)."""
    pairs: list[dict] = []
    stats: list[dict] = []
    if rows:
        new_rows, stats = build_pairs(rows, generations, ranker, answer_key=answer_key)
        pairs = drop_empty_responses(new_rows, stats)
    scored = (
        score_eval_responses(ranker, list(eval_rows), generations, answer_key) if eval_rows else []
    )
    return pairs, stats, scored


def _rows_to_rank(path: str, skipped: set[str], id_prefix: str = "") -> list[dict]:
    """The rows of ``path``, each with a prompt_id (a missing or mistyped one is refused naming
    the row), less those whose prompt ``selm generate`` skipped (counted in the log)."""
    rows, left_out = [], 0
    for row_number, row in read_records(path, with_row_numbers=True):
        if id_prefix + prompt_key(row.get("prompt_id"), f"{path} row {row_number}") in skipped:
            left_out += 1
        else:
            rows.append(row)
    if left_out:
        logger.warning(
            "%s: left out %d rows whose prompt selm generate skipped (special-token text, "
            "data.special_tokens_in_text=skip)",
            path,
            left_out,
        )
    return rows


def _check_arguments(args) -> None:
    if (args.rows is None) != (args.out is None):
        raise InputError("--rows and --out go together (the rows to pair and where the pairs go)")
    if (args.eval_rows is None) != (args.eval_out is None):
        raise InputError("--eval-rows and --eval-out go together")
    if args.rows is None and args.eval_rows is None:
        raise InputError(
            "nothing to do: pass --rows/--out (new pairs) and/or "
            "--eval-rows/--eval-out (held-out scores)"
        )
    for flag, path in (("--out", args.out), ("--stats", args.stats), ("--eval-out", args.eval_out)):
        if path is not None:
            check_output_dir(Path(path).absolute().parent, what=flag)


def output_paths(args) -> dict[Path, str]:
    """The files ``selm rank`` writes, each with the flag naming it: pairs and stats (with
    --rows), held-out scores (in this order)."""
    paths: dict[Path, str] = {}
    if args.out is not None:
        out = Path(args.out)
        paths[out] = "--out"
        paths[Path(args.stats) if args.stats else out.with_name(out.stem + ".stats.jsonl")] = (
            "--stats"
        )
    if args.eval_out is not None:
        paths[Path(args.eval_out)] = "--eval-out"
    return paths


def check_pairs_left(stats: Sequence[Mapping[str, Any]], generations_path: str) -> None:
    """Refuse a ranking whose every new pair has an empty chosen, rejected or y_ref."""
    if stats and all(s["dropped_empty"] for s in stats):
        raise InputError(
            f"every one of the {len(stats)} new pairs has an empty chosen, rejected or y_ref "
            f"response; check the generations ({generations_path})"
        )


def main(args) -> int:
    """New pairs from --rows and/or held-out scores of --eval-rows, one ranker load per ranker
    process (ranking.num_workers per node; ``selm_mcore.rollout.rank_workers``). Holds the lock
    of each file it writes (this node's part with --num-nodes) and refuses to replace one
    without --overwrite."""
    from selm_mcore.rollout.engines import node_output_path, node_rank_from_env

    _check_arguments(args)
    node_rank = 0
    if args.num_nodes > 1:
        node_rank = args.node_rank if args.node_rank is not None else node_rank_from_env()
    named = output_paths(args)
    outputs = named
    if args.num_nodes > 1:  # this node's part; the phase joins them (merge_rank_nodes)
        outputs = {node_output_path(path, node_rank): flag for path, flag in named.items()}
    with output_locks(outputs, command="selm rank"):
        for path, flag in outputs.items():
            refuse_finished(path, setting=flag, overwrite=args.overwrite, what="ranking results")
        _rank(args, progress_path=next(iter(named)), paths=list(outputs), node_rank=node_rank)
    return 0


def _rank(args, *, progress_path: Path, paths: list[Path], node_rank: int) -> None:
    """``selm rank``'s work once its outputs are locked: rank, then write ``paths``."""
    from selm_mcore.rollout.rank_workers import rank_rows
    from selm_mcore.runtime.device import apply_device_setting

    cfg = config_from_args(args)
    apply_device_setting(cfg.parallel.device)
    generations, skipped = read_generations(args.generations)
    rows = _rows_to_rank(args.rows, skipped) if args.rows is not None else []
    eval_rows = _rows_to_rank(args.eval_rows, skipped, EVAL_ID_PREFIX) if args.eval_rows else []
    if args.rows is not None:
        warn_repeated_prompt_ids(rows, args.rows)
    logger.info(
        "ranking %d rows and %d held-out rows with %s", len(rows), len(eval_rows), cfg.ranking.kind
    )
    result = rank_rows(
        cfg.ranking,
        cfg.model.trust_remote_code,
        rows,
        eval_rows,
        generations,
        progress_path=progress_path,
        num_nodes=args.num_nodes,
        node_rank=node_rank,
    )
    if args.num_nodes == 1 and args.rows is not None:
        check_pairs_left(result.stats, args.generations)
    if args.rows is not None:
        write_jsonl_atomic(paths[0], result.pairs)
        write_jsonl_atomic(paths[1], result.stats)
        logger.info(
            "wrote %d pairs to %s; %s",
            len(result.pairs),
            paths[0],
            json.dumps(summarize_stats(result.stats)),
        )
    if args.eval_rows is not None:
        scored = result.eval_scores
        write_jsonl_atomic(paths[-1], scored)
        if scored:
            logger.info(
                "held-out: %d responses, mean score %.4f",
                len(scored),
                sum(r["score"] for r in scored) / len(scored),
            )
