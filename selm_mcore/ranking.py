"""Rank candidate responses and turn the ranking into new preference pairs.

SELM step 3 (see ``docs/architecture.md`` and the reference notes): per prompt, rank
``[y_ref, y_w, y_l]`` (in this order) against the raw prompt text; the best-ranked candidate
becomes the new chosen, the worst-ranked the new rejected, and ties go to the first index, so
y_ref wins ties and a full tie gives chosen == rejected (a zero DPO gradient). The original y_w
can end up rejected. Prompt-only rows rank their k generated samples instead.

Rankers share one small interface (``Ranker``): ``scores(prompts, candidates) -> (n, c) float``
(higher is better) and ``rank(...) -> (n, c) int`` (1 = best, ties share the better rank, as
llm-blender does). Implementations:

* ``PairRMRanker``: PairRM through llm-blender (``Blender.loadranker`` + ``Blender.rank``). This
  module is the only importer of ``llm_blender``; ``import_llm_blender()`` applies the small
  compatibility fixes llm-blender 0.0.2 needs under transformers 5 right before importing it.
* ``RewardModelRanker``: any HF ``AutoModelForSequenceClassification`` scoring the chat-templated
  prompt + response (logit 0).
* ``VerifiableAnswerRanker``: rows carrying a checkable ``answer``; a correct final answer beats a
  wrong one, and among correct answers the shorter one wins.

``build_tiny_pairrm(out_dir)`` writes an offline PairRM-shaped ranker (tiny DeBERTa-v2 backbone,
PairRM's checkpoint layout and weight names) whose order is known: it prefers longer (or
shorter) candidates. Tests and the CPU demo use it where the real PairRM weights are absent.

Run as ``selm rank CONFIG --rows ROWS.jsonl --generations GEN.jsonl --out PAIRS.jsonl``.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selm_mcore.config import RankingConfig, add_config_arguments, config_from_args
from selm_mcore.generation import read_jsonl, write_jsonl_atomic

logger = logging.getLogger(__name__)

PAIRRM_PREFIX_TOKENS = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]
PREFERENCE_CANDIDATES = ("y_ref", "y_w", "y_l")


class RankerError(RuntimeError):
    """A ranker failed or returned something unusable; the round must stop."""


# --- llm-blender under transformers 5 ---------------------------------------------------------


def _encode_texts(texts, tokenizer, max_length=None):
    """llm-blender's ``collator.encode_texts`` without ``batch_encode_plus`` (removed in
    transformers 5): the same call through ``tokenizer.__call__``."""
    encoded = tokenizer(list(texts), max_length=max_length, padding="max_length",
                        return_tensors="pt", truncation=True)
    return encoded["input_ids"], encoded["attention_mask"]


def import_llm_blender():
    """Import and return ``llm_blender`` with the fixes llm-blender 0.0.2 needs under
    transformers 5. All compatibility code for llm-blender lives here.

    1. ``transformers.utils.hub.TRANSFORMERS_CACHE`` was removed in transformers 5; llm-blender
       imports it by name (as the default ``cache_dir``). Restored as the hub cache path.
    2. ``PreTrainedTokenizerBase.batch_encode_plus`` was removed; llm-blender's collator calls it
       in ``encode_texts``. Its module function is replaced by ``_encode_texts`` (same arguments,
       same result), which touches llm-blender only, not transformers' tokenizers.
    3. ``llm_blender.blender`` imports vLLM when installed (only for ``n_generate``, unused here);
       the import is blocked while llm-blender loads so the ranker process stays free of vLLM
       (2.5 s of imports and its global patches). An already imported vLLM is left alone.

    The fixes are idempotent. If llm-blender changes so that a fix no longer fits, this raises
    ImportError naming the fix (pin ``llm-blender==0.0.2``, extra ``selm-mcore[ranking]``).
    """
    if "llm_blender" in sys.modules and getattr(sys.modules["llm_blender"], "_selm_compat", False):
        return sys.modules["llm_blender"]
    import transformers.utils.hub as transformers_hub

    if not hasattr(transformers_hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub import constants as hub_constants

        transformers_hub.TRANSFORMERS_CACHE = hub_constants.HF_HUB_CACHE
    block_vllm = "vllm" not in sys.modules
    if block_vllm:
        sys.modules["vllm"] = None  # makes `import vllm` raise ImportError
    try:
        import llm_blender
        from llm_blender.pair_ranker import collator
    except ImportError as exc:
        raise ImportError(
            f"importing llm_blender failed even with the transformers-5 compatibility fixes "
            f"({exc}); install the pinned version: pip install --no-deps llm-blender==0.0.2 "
            "dataclasses-json (extra selm-mcore[ranking])") from exc
    finally:
        if block_vllm and sys.modules.get("vllm", 0) is None:
            del sys.modules["vllm"]
    if not callable(getattr(collator, "encode_texts", None)):
        raise ImportError("llm_blender.pair_ranker.collator.encode_texts is gone: the "
                          "batch_encode_plus fix no longer applies; pin llm-blender==0.0.2")
    collator.encode_texts = _encode_texts
    llm_blender._selm_compat = True
    return llm_blender


# --- the ranker interface ---------------------------------------------------------------------


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """(n, c) scores (higher is better) -> (n, c) int ranks, 1 = best, ties share the better
    rank (llm-blender's rule: rank = 1 + number of strictly better candidates)."""
    scores = np.asarray(scores, dtype=np.float64)
    return 1 + (scores[:, None, :] > scores[:, :, None]).sum(axis=-1).astype(np.int64)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Ranker(abc.ABC):
    """Scores candidates per prompt. Subclasses implement ``_scores``; the public methods check
    the result (shape, finiteness) so a broken ranker stops the round instead of producing
    silently wrong pairs."""

    name = "ranker"

    @abc.abstractmethod
    def _scores(self, prompts: list[str], candidates: list[list[str]],
                answers: list[str | None] | None) -> np.ndarray:
        """(n, c) float scores, higher is better."""

    def scores(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
               answers: Sequence[str | None] | None = None) -> np.ndarray:
        """Scores of ``candidates[i][j]`` for ``prompts[i]`` as a float64 (n, c) array.

        ``answers`` (one per prompt, or None) is used by rankers that check answers and ignored
        by the others. Every prompt needs the same number of candidates (>= 1)."""
        prompts = list(prompts)
        candidates = [list(c) for c in candidates]
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        if not prompts:
            return np.zeros((0, 0))
        width = len(candidates[0])
        for i, cands in enumerate(candidates):
            if len(cands) != width or width == 0:
                raise ValueError(f"prompt {i} has {len(cands)} candidates, prompt 0 has {width}: "
                                 "rank groups of equal size (>= 1)")
            for j, text in enumerate(cands):
                if not isinstance(text, str):
                    raise ValueError(f"candidate [{i}][{j}] is {type(text).__name__}, not str")
        answers = None if answers is None else list(answers)
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        try:
            result = self._scores(prompts, candidates, answers)
        except RankerError:
            raise
        except Exception as exc:
            raise RankerError(f"{self.name} ranker failed on {len(prompts)} prompts: "
                              f"{type(exc).__name__}: {exc}") from exc
        result = np.asarray(result, dtype=np.float64)
        if result.shape != (len(prompts), width):
            raise RankerError(f"{self.name} ranker returned scores of shape {result.shape}, "
                              f"expected ({len(prompts)}, {width})")
        if not np.isfinite(result).all():
            bad = int(np.argwhere(~np.isfinite(result))[0][0])
            raise RankerError(f"{self.name} ranker returned non-finite scores for prompt {bad}: "
                              f"{result[bad].tolist()}")
        return result

    def rank(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
             answers: Sequence[str | None] | None = None) -> np.ndarray:
        """(n, c) int ranks, 1 = best, ties share the better rank."""
        return ranks_from_scores(self.scores(prompts, candidates, answers=answers))


class PairRMRanker(Ranker):
    """PairRM (or any llm-blender pairranker folder) through ``llm_blender.Blender``.

    ``model_path`` is a local ranker folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) or a hub id that llm-blender downloads. ``backbone`` is a local
    DeBERTa folder (tokenizer + config, e.g. microsoft/deberta-v3-large downloaded once); it is
    passed as ``model_name=`` so nothing is fetched from the hub; without it the backbone named in
    the ranker's config.json is used. Scores are llm-blender's: all ordered pairs are compared,
    score_i = mean_j (M[i, j] - M[j, i]).
    """

    name = "pairrm"

    def __init__(self, model_path: str, *, backbone: str = "", device: str = "auto",
                 batch_size: int = 8):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        local = Path(model_path)
        if local.exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"ranking.model_path={model_path} has no config.json: not an llm-blender ranker "
                "folder (expected config.json + model.safetensors or pytorch_model.bin)")
        if backbone and not Path(backbone).is_dir():
            raise FileNotFoundError(
                f"ranking.backbone={backbone} is not a folder; download the DeBERTa backbone "
                "(e.g. microsoft/deberta-v3-large) and point ranking.backbone at it, or set "
                "ranking.backbone='' to use the name in the ranker's config.json")
        llm_blender = import_llm_blender()
        self.blender = llm_blender.Blender(
            blender_config=llm_blender.BlenderConfig(device=self.device, use_tqdm=False))
        kwargs = {"model_name": backbone} if backbone else {}
        try:
            self.blender.loadranker(model_path, device=self.device, **kwargs)
        except Exception as exc:
            hint = "" if local.exists() else (
                f" ({model_path} is not a local folder: llm-blender tries the hub, which fails "
                "offline; download it once and set ranking.model_path to the folder)")
            raise RankerError(f"loading the PairRM ranker from {model_path} failed: "
                              f"{type(exc).__name__}: {exc}{hint}") from exc
        if self.blender.ranker_config.ranker_type != "pairranker":
            raise RankerError(f"{model_path} is a {self.blender.ranker_config.ranker_type!r} "
                              "ranker; PairRMRanker needs ranker_type 'pairranker'")
        self._check_loaded_keys(Path(self.blender.ranker_config.load_checkpoint or model_path))

    def _check_loaded_keys(self, folder: Path) -> None:
        """llm-blender loads pytorch_model.bin with strict=False and only logs missing keys: a
        checkpoint that does not match the backbone must not rank with random weights."""
        expected = set(self.blender.ranker.state_dict())
        if (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                found = set(handle.keys())
        elif (folder / "pytorch_model.bin").is_file():
            import torch

            found = set(torch.load(folder / "pytorch_model.bin", map_location="cpu", mmap=True,
                                   weights_only=True))
        else:
            return
        missing = sorted(expected - found)
        if missing:
            raise RankerError(f"ranker checkpoint {folder} lacks {len(missing)} weights of the "
                              f"model built from its backbone (first: {missing[:3]}); the "
                              "backbone (ranking.backbone) does not match the checkpoint")

    def _scores(self, prompts, candidates, answers):
        return self.blender.rank(prompts, candidates, return_scores=True,
                                 batch_size=self.batch_size, disable_tqdm=True)


class RewardModelRanker(Ranker):
    """Any HF sequence-classification reward model: score = logit 0 of the chat-templated
    [user: prompt, assistant: response] conversation. A tokenizer without a chat template gets
    the (prompt, response) text pair instead (the DeBERTa reward-model convention)."""

    name = "reward_model"

    def __init__(self, model_path: str, *, device: str = "auto", batch_size: int = 8,
                 max_length: int = 2048, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"ranking.model_path={model_path} is not a local folder with "
                                    "an HF sequence-classification model")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=trust_remote_code,
            dtype=torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
        ).to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _encode(self, prompt: str, response: str) -> list[int]:
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, response)["input_ids"]
        return ids[-self.max_length:]

    def _scores(self, prompts, candidates, answers):
        import torch

        flat = [self._encode(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        out = []
        with torch.no_grad():
            for start in range(0, len(flat), self.batch_size):
                batch = self.tokenizer.pad({"input_ids": flat[start:start + self.batch_size]},
                                           return_tensors="pt")
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits
                out.append(logits[:, 0].float().cpu())
        return torch.cat(out).numpy().reshape(len(prompts), -1)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


class VerifiableAnswerRanker(Ranker):
    """Prompts with a checkable answer (rows carrying ``answer``).

    Rule: a numeric answer is matched against the LAST number in the response (|diff| <= 1e-6);
    a non-numeric answer must appear in the response as a whole word, case-insensitive.
    Score = 1 + 1 / (1 + len(response)) when correct (correct beats wrong; the shorter correct
    response wins), 0 when wrong or without an answer: all-wrong candidates tie (chosen ==
    rejected, no gradient from that row).
    """

    name = "verifiable"

    @staticmethod
    def is_correct(response: str, answer: str) -> bool:
        answer = str(answer).strip()
        try:
            target = float(answer.replace(",", ""))
        except ValueError:
            return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", response, re.I) is not None
        got = final_number(response)
        return got is not None and math.isclose(got, target, rel_tol=0.0, abs_tol=1e-6)

    def _scores(self, prompts, candidates, answers):
        if answers is None or any(a is None or str(a).strip() == "" for a in answers):
            missing = 0 if answers is None else next(
                i for i, a in enumerate(answers) if a is None or str(a).strip() == "")
            raise RankerError(f"verifiable ranker: prompt {missing} has no answer; every row "
                              "needs a non-empty 'answer' field (ranking.kind=verifiable)")
        return np.array([[1.0 + 1.0 / (1 + len(c)) if self.is_correct(c, a) else 0.0
                          for c in cands] for cands, a in zip(candidates, answers)])


def build_ranker(cfg: RankingConfig, *, trust_remote_code: bool = False) -> Ranker:
    """The ranker named by ``ranking.kind``."""
    if cfg.kind == "pairrm":
        return PairRMRanker(cfg.model_path, backbone=cfg.backbone, device=cfg.device,
                            batch_size=cfg.batch_size)
    if cfg.kind == "reward_model":
        return RewardModelRanker(cfg.model_path, device=cfg.device, batch_size=cfg.batch_size,
                                 max_length=cfg.max_length, trust_remote_code=trust_remote_code)
    if cfg.kind == "verifiable":
        return VerifiableAnswerRanker()
    raise ValueError(f"ranking.kind={cfg.kind!r} is not one of pairrm, reward_model, verifiable")


# --- new preference pairs ---------------------------------------------------------------------


def _prompt_messages(row: Mapping[str, Any], where: str) -> list[dict]:
    """The conversation up to the response: chosen minus its last (assistant) turn for preference
    rows; ``messages`` minus trailing assistant turns, or [user: prompt], for prompt-only rows."""
    if "chosen" in row:
        chosen = row["chosen"]
        if not isinstance(chosen, list) or not chosen or chosen[-1].get("role") != "assistant":
            raise ValueError(f"{where}: 'chosen' must be a message list ending with an assistant "
                             "turn (UltraFeedback-binarized schema)")
        return [dict(m) for m in chosen[:-1]]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    messages = list(row.get("messages") or [])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages:
        raise ValueError(f"{where}: needs 'prompt' (str) or 'messages' ending with a user turn")
    return [dict(m) for m in messages]


def _prompt_text(row: Mapping[str, Any], messages: list[dict]) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return next(m["content"] for m in reversed(messages) if m.get("role") == "user")


def _last_assistant(conversation: Any, key: str, where: str) -> str:
    if (not isinstance(conversation, list) or not conversation
            or conversation[-1].get("role") != "assistant"):
        raise ValueError(f"{where}: '{key}' must be a message list ending with an assistant turn")
    return conversation[-1]["content"]


def build_pairs(rows: Sequence[Mapping[str, Any]], y_refs: Mapping[str, Sequence[str] | str],
                ranker: Ranker, *, answer_key: str = "answer"
                ) -> tuple[list[dict], list[dict]]:
    """New preference rows from ranked candidates (SELM step 3).

    ``rows``: preference rows (UltraFeedback-binarized: prompt, prompt_id, chosen, rejected) or
    prompt-only rows (prompt_id + prompt or messages). ``y_refs``: prompt_id -> the policy's
    responses (``generate_file`` output; a str counts as one response).

    * Preference row: candidates [y_ref, y_w, y_l] with y_ref = responses[0].
    * Prompt-only row: candidates = all its responses (k >= 2); reference_response = the first.

    Ranked against the raw prompt text. chosen = the best rank, rejected = the worst rank, ties to
    the lowest index (so y_ref wins ties; a full tie gives chosen == rejected).

    Returns (new rows, per-row stats). New rows keep the schema: prompt, prompt_id, chosen,
    rejected, messages (= chosen), score_chosen, score_rejected (ranker scores) and
    reference_response (y_ref, whatever the ranker did with it); other input keys are kept.
    Stats: prompt_id, candidate names, scores, ranks, chosen/rejected index and name.
    """
    groups: dict[int, list[int]] = {}
    prepared = []
    for index, row in enumerate(rows):
        prompt_id = row.get("prompt_id")
        where = f"row {index} (prompt_id={prompt_id!r})"
        if prompt_id is None:
            raise ValueError(f"row {index}: missing 'prompt_id'")
        if prompt_id not in y_refs:
            raise KeyError(f"{where}: no generated response for this prompt_id in the "
                           "generations; regenerate this round's responses")
        responses = y_refs[prompt_id]
        responses = [responses] if isinstance(responses, str) else list(responses)
        if not responses:
            raise ValueError(f"{where}: the generations hold no response")
        messages = _prompt_messages(row, where)
        if "chosen" in row or "rejected" in row:
            y_w = _last_assistant(row.get("chosen"), "chosen", where)
            y_l = _last_assistant(row.get("rejected"), "rejected", where)
            candidates, names = [responses[0], y_w, y_l], list(PREFERENCE_CANDIDATES)
        else:
            if len(responses) < 2:
                raise ValueError(f"{where}: a prompt-only row needs >= 2 generated responses to "
                                 f"form a pair, got {len(responses)}; set generation.n >= 2")
            candidates = responses
            names = [f"sample_{k}" for k in range(len(responses))]
        prepared.append((row, messages, _prompt_text(row, messages), candidates, names))
        groups.setdefault(len(candidates), []).append(index)

    scores: list[np.ndarray | None] = [None] * len(prepared)
    for indices in groups.values():
        group_scores = ranker.scores([prepared[i][2] for i in indices],
                                     [prepared[i][3] for i in indices],
                                     answers=[prepared[i][0].get(answer_key) for i in indices])
        for i, s in zip(indices, group_scores):
            scores[i] = s

    new_rows, stats = [], []
    for (row, messages, prompt, candidates, names), row_scores in zip(prepared, scores):
        ranks = ranks_from_scores(row_scores[None])[0]
        best, worst = int(np.argmin(ranks)), int(np.argmax(ranks))  # first index wins ties
        chosen = messages + [{"role": "assistant", "content": candidates[best]}]
        rejected = messages + [{"role": "assistant", "content": candidates[worst]}]
        new_row = {k: v for k, v in row.items() if k != "responses"}
        new_row.update(prompt=prompt, prompt_id=row["prompt_id"], chosen=chosen,
                       rejected=rejected, messages=chosen,
                       score_chosen=float(row_scores[best]),
                       score_rejected=float(row_scores[worst]),
                       reference_response=candidates[0])
        new_rows.append(new_row)
        stats.append({
            "prompt_id": row["prompt_id"], "candidates": names,
            "scores": [float(s) for s in row_scores], "ranks": [int(r) for r in ranks],
            "chosen_index": best, "rejected_index": worst,
            "chosen": names[best], "rejected": names[worst], "tie": best == worst,
        })
    return new_rows, stats


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


def load_generations(path: str | os.PathLike) -> dict[str, list[str]]:
    """``generate_file`` output -> {prompt_id: responses}."""
    out: dict[str, list[str]] = {}
    for index, row in enumerate(read_jsonl(path)):
        if "prompt_id" not in row or not isinstance(row.get("responses"), list):
            raise ValueError(f"{path} row {index}: expected keys prompt_id and responses (list)")
        out[row["prompt_id"]] = row["responses"]
    return out


# --- a tiny offline PairRM --------------------------------------------------------------------

_TINY_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from have not but "
    "what which one all were when we there can your if will each about how up out then so would "
    "answer question number plus minus times sum is are yes no good bad because step first next "
    "final result help please thanks sorry hello world story sea cat dog water"
).split()


def _tiny_deberta_tokenizer():
    """A DeBERTa-v2 (Unigram, Metaspace) tokenizer built from a hand-written vocabulary: the
    DeBERTa special tokens, every printable ASCII character (alone and word-initial) and a few
    common words. No download, no training; with PairRM's four prefix tokens added."""
    import string

    from transformers import DebertaV2Tokenizer

    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), ("\u2581", -9.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(char, -10.0), ("\u2581" + char, -10.5)]
    vocab += [("\u2581" + word, -4.0 - 0.1 * len(word)) for word in _TINY_WORDS]
    vocab.append(("[MASK]", 0.0))
    tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=4096)
    tokenizer.add_tokens(PAIRRM_PREFIX_TOKENS)
    return tokenizer


def build_tiny_pairrm(out_dir: str | os.PathLike, seed: int = 0, *, prefer: str = "longer",
                      hidden_size: int = 32) -> Path:
    """Write a tiny PairRM-shaped llm-blender ranker folder that loads fully offline.

    Layout (as llm-blender's ``loadranker`` expects for llm-blender/PairRM)::

        out_dir/config.json        RankerConfig (pairranker, deberta, PairRM's max lengths),
                                   model_name = out_dir/backbone (absolute path)
        out_dir/model.safetensors  CrossCompareReranker state dict (pretrained_model.*,
                                   head_layer.1/.4.*), the names PairRM's checkpoint uses
        out_dir/backbone/          tiny DeBERTa-v2 config + weights + tokenizer (with
                                   <|source|> <|candidate1|> <|candidate2|> <|candidate|>)

    ``prefer``: "longer" or "shorter" gives a known order: the comparison only sees where the
    second candidate starts, i.e. the first candidate's token count. Absolute position embeddings
    encode the position; attention and feed-forward outputs are zeroed so every layer passes its
    input through (LayerNorm only); the head reads one normalised position feature that is
    monotone in the position. So score_i grows (or falls) strictly with candidate i's token
    length and equal-length candidates tie exactly. "random" keeps the random head (near-ties).
    """
    import torch
    from safetensors.torch import save_model
    from transformers import DebertaV2Config, DebertaV2Model

    if prefer not in ("longer", "shorter", "random"):
        raise ValueError(f"prefer={prefer!r} must be 'longer', 'shorter' or 'random'")
    out_dir = Path(out_dir).absolute()
    backbone_dir = out_dir / "backbone"
    backbone_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_deberta_tokenizer()
    tokenizer.save_pretrained(str(backbone_dir))
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=2560,
        type_vocab_size=0, position_biased_input=True, relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=256, max_relative_positions=-1,
        norm_rel_ebd="layer_norm", share_att_key=True, layer_norm_eps=1e-7,
        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    DebertaV2Model(config).save_pretrained(str(backbone_dir))
    ranker_config = {
        "ranker_type": "pairranker", "model_type": "deberta", "model_name": str(backbone_dir),
        "cache_dir": None, "load_checkpoint": None, "source_maxlength": 1224,
        "candidate_maxlength": 412, "n_tasks": 1, "num_pos": 5, "num_neg": 5,
        "sub_sampling_mode": "all_pair", "sub_sampling_ratio": 0.4, "loss_type": "instructgpt",
        "reduce_type": "linear", "inference_mode": "bubble", "drop_out": 0.05, "fp16": True,
        "device": None,
    }
    (out_dir / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")

    # Build the ranker module with llm-blender's own code so the weight names are its names.
    llm_blender = import_llm_blender()
    from llm_blender.blender.blender_utils import load_ranker

    cfg = llm_blender.RankerConfig.from_dict({**ranker_config, "cache_dir": None})
    ranker, _, _ = load_ranker(cfg)
    if prefer != "random":
        _set_length_preference(ranker, hidden_size, sign=1.0 if prefer == "longer" else -1.0)
    save_model(ranker, str(out_dir / "model.safetensors"))
    return out_dir


def _set_length_preference(ranker, hidden: int, sign: float) -> None:
    """Weights that make the pair comparison a function of the second candidate's position."""
    import torch

    backbone = ranker.pretrained_model
    with torch.no_grad():
        backbone.embeddings.word_embeddings.weight.zero_()
        positions = torch.arange(backbone.embeddings.position_embeddings.num_embeddings,
                                 dtype=torch.float32)
        table = torch.zeros(len(positions), backbone.embeddings.embedding_size)
        # Feature pair (-p, +p) and a constant pair (c, -c): zero mean, so after LayerNorm
        # feature 0 equals -sqrt(H/2) * p / sqrt(p^2 + c^2), strictly decreasing in p.
        table[:, 0], table[:, 1] = -positions, positions
        table[:, 2], table[:, 3] = 4096.0, -4096.0
        backbone.embeddings.position_embeddings.weight.copy_(table)
        for layer in backbone.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        first, last = ranker.head_layer[1], ranker.head_layer[4]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, hidden] = 0.5  # reads feature 0 of the candidate prefix token
        last.weight.zero_()
        last.bias.zero_()
        # M[i, j] = h(cand1 prefix) - h(cand2 prefix at p0 + len_i); h falls with p, so
        # score_i = mean_j (h(p0 + len_j) - h(p0 + len_i)) rises with len_i for sign = +1.
        last.weight[0, 0] = sign


# --- CLI: selm rank ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--rows", required=True,
                        help="JSONL of this round's rows (preference or prompt-only)")
    parser.add_argument("--generations", required=True,
                        help="JSONL written by `selm generate` (prompt_id, responses)")
    parser.add_argument("--out", required=True, help="JSONL of new preference pairs")
    parser.add_argument("--stats", default=None,
                        help="JSONL of per-row ranking stats (default: OUT with .stats.jsonl)")


def main(args) -> int:
    cfg = config_from_args(args)
    rows = read_jsonl(args.rows)
    generations = load_generations(args.generations)
    ranker = build_ranker(cfg.ranking, trust_remote_code=cfg.model.trust_remote_code)
    logger.info("ranking %d rows with %s", len(rows), ranker.name)
    new_rows, stats = build_pairs(rows, generations, ranker, answer_key=cfg.ranking.answer_key)
    out = Path(args.out)
    write_jsonl_atomic(out, new_rows)
    stats_path = Path(args.stats) if args.stats else out.with_name(out.stem + ".stats.jsonl")
    write_jsonl_atomic(stats_path, stats)
    logger.info("wrote %d pairs to %s; %s", len(new_rows), out,
                json.dumps(summarize_stats(stats)))
    return 0
