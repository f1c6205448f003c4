"""Rankers: score candidate responses per prompt (PairRM via llm-blender, reward models,
verifiable answers). What SELM makes of the scores (new pairs, held-out scores, ``selm rank``)
is ``selm_mcore.rollout.pairs``.

Rankers share one small interface (``Ranker``): ``scores(prompts, candidates) -> (n, c) float``
(higher is better) and ``rank(...) -> (n, c) int`` (1 = best, ties share the better rank, as
llm-blender does). Implementations:

* ``PairRMRanker``: PairRM through llm-blender (``Blender.loadranker`` + ``Blender.rank``). This
  module is the only importer of ``llm_blender``; ``import_llm_blender()`` applies the small
  compatibility fixes llm-blender 0.0.2 needs under transformers 5 right before importing it.
  llm-blender builds the ranker; its weights are read here (safetensors, or ``pytorch_model.bin``
  through the restricted unpickler of ``selm_mcore.runtime.pickles``), never by llm-blender's
  ``torch.load``.
* ``RewardModelRanker``: any HF ``AutoModelForSequenceClassification`` scoring the chat-templated
  prompt + response (logit 0).
* ``VerifiableAnswerRanker``: rows carrying a checkable ``answer``; a correct final answer beats a
  wrong one, and among correct answers the shorter one wins.

``selm_mcore.testing.assets.build_tiny_pairrm(out_dir)`` writes an offline PairRM-shaped ranker
whose order is known; tests use it where the real PairRM weights are absent.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selm_mcore.config.schema import RankingConfig
from selm_mcore.data.templates import render_chat_template
from selm_mcore.runtime.errors import UserError

logger = logging.getLogger(__name__)

PAIRRM_PREFIX_TOKENS = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"]


class RankerError(UserError, RuntimeError):
    """A ranker failed or returned something unusable; the round must stop."""


# --- llm-blender under transformers 5 ---------------------------------------------------------


def _encode_texts(texts, tokenizer, max_length=None):
    """llm-blender's ``collator.encode_texts`` without ``batch_encode_plus`` (removed in
    transformers 5): the same call through ``tokenizer.__call__``."""
    encoded = tokenizer(
        list(texts),
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
        truncation=True,
    )
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
            "dataclasses-json (extra selm-mcore[ranking])"
        ) from exc
    finally:
        if block_vllm and sys.modules.get("vllm", 0) is None:
            del sys.modules["vllm"]
    if not callable(getattr(collator, "encode_texts", None)):
        raise ImportError(
            "llm_blender.pair_ranker.collator.encode_texts is gone: the "
            "batch_encode_plus fix no longer applies; pin llm-blender==0.0.2"
        )
    collator.encode_texts = _encode_texts
    llm_blender._selm_compat = True
    return llm_blender


def pairrm_classes() -> tuple[Any, Any, Any]:
    """llm-blender's (RankerConfig, CrossCompareCollator, CrossCompareReranker): what
    ``Blender.loadranker`` builds PairRM from, for a ranker built in memory (the ranker
    benchmark, ``selm_mcore.bench.ranker``)."""
    llm_blender = import_llm_blender()
    from llm_blender.pair_ranker.collator import CrossCompareCollator
    from llm_blender.pair_ranker.ranker import CrossCompareReranker

    return llm_blender.RankerConfig, CrossCompareCollator, CrossCompareReranker


# --- the ranker interface ---------------------------------------------------------------------


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """(n, c) scores (higher is better) -> (n, c) int ranks, 1 = best, ties share the better
    rank (llm-blender's rule: rank = 1 + number of strictly better candidates)."""
    scores = np.asarray(scores, dtype=np.float64)
    return 1 + (scores[:, None, :] > scores[:, :, None]).sum(axis=-1).astype(np.int64)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu" (a visible NVIDIA device that torch
    cannot use stops with the fix: ``selm_mcore.runtime.device``); anything else as is."""
    if device != "auto":
        return device
    from selm_mcore.runtime.device import check_device

    return check_device("auto")


class Ranker(abc.ABC):
    """Scores candidates per prompt. Subclasses implement ``_scores``; the public methods check
    the result (shape, finiteness) so a broken ranker stops the round instead of producing
    silently wrong pairs."""

    name = "ranker"
    # Called with the number of prompts scored, as they are scored (progress lines); rankers
    # that score in batches (counts_batches) call it per batch, the others per ``scores`` call.
    progress: Callable[[int], None] | None = None
    counts_batches = False

    def _count(self, prompts: int) -> None:
        if self.progress is not None:
            self.progress(prompts)

    @abc.abstractmethod
    def _scores(
        self, prompts: list[str], candidates: list[list[str]], answers: list[str | None] | None
    ) -> np.ndarray:
        """(n, c) float scores, higher is better."""

    def scores(
        self,
        prompts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        *,
        answers: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Scores of ``candidates[i][j]`` for ``prompts[i]`` as a float64 (n, c) array.

        ``answers`` (one per prompt, or None) is used by rankers that check answers and ignored
        by the others. Every prompt needs the same number of candidates (>= 1)."""
        prompts = list(prompts)
        candidate_lists: list[list[str]] = [list(c) for c in candidates]
        if len(prompts) != len(candidate_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(candidate_lists)} candidate lists")
        if not prompts:
            return np.zeros((0, 0))
        width = len(candidate_lists[0])
        for i, cands in enumerate(candidate_lists):
            if len(cands) != width or width == 0:
                raise ValueError(
                    f"prompt {i} has {len(cands)} candidates, prompt 0 has {width}: "
                    "rank groups of equal size (>= 1)"
                )
            for j, text in enumerate(cands):
                if not isinstance(text, str):
                    raise ValueError(f"candidate [{i}][{j}] is {type(text).__name__}, not str")
        answers = None if answers is None else list(answers)
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        try:
            result = self._scores(prompts, candidate_lists, answers)
            if not self.counts_batches:
                self._count(len(prompts))
        except RankerError:
            raise
        except Exception as exc:
            raise RankerError(
                f"{self.name} ranker failed on {len(prompts)} prompts: {type(exc).__name__}: {exc}"
            ) from exc
        result = np.asarray(result, dtype=np.float64)
        if result.shape != (len(prompts), width):
            raise RankerError(
                f"{self.name} ranker returned scores of shape {result.shape}, "
                f"expected ({len(prompts)}, {width})"
            )
        if not np.isfinite(result).all():
            bad = int(np.argwhere(~np.isfinite(result))[0][0])
            raise RankerError(
                f"{self.name} ranker returned non-finite scores for prompt {bad}: "
                f"{result[bad].tolist()}"
            )
        return result

    def rank(
        self,
        prompts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        *,
        answers: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """(n, c) int ranks, 1 = best, ties share the better rank."""
        return ranks_from_scores(self.scores(prompts, candidates, answers=answers))


# Reward models llm-blender recognises by name and loads its own way (not PairRM); Starling's
# loader calls torch.load without weights_only.
LLM_BLENDER_OTHER_MODELS = (
    "OpenAssistant/reward-model-deberta-v3-large-v2",
    "berkeley-nest/Starling-RM-7B-alpha",
    "openbmb/UltraRM-13b",
)


def _check_pairrm_path(model_path: str) -> None:
    """Refuse, before llm-blender reads anything, a ranker that is not a pairranker: one of the
    reward models llm-blender loads by name, or a local folder whose config says otherwise."""
    other = [name for name in LLM_BLENDER_OTHER_MODELS if model_path.rstrip("/").endswith(name)]
    if other:
        raise RankerError(
            f"ranking.model_path={model_path} names {other[0]}, a reward model llm-blender loads "
            "its own way, not a PairRM ranker; score with it through ranking.kind=reward_model "
            "and a local folder"
        )
    config = Path(model_path) / "config.json"
    if config.is_file():
        try:
            ranker_type = json.loads(config.read_text()).get("ranker_type")
        except (ValueError, AttributeError) as exc:
            raise RankerError(f"{config} is not a readable JSON object ({exc})") from None
        if ranker_type != "pairranker":
            raise RankerError(
                f"{model_path} is a {ranker_type!r} ranker (its config.json); PairRMRanker "
                "needs ranker_type 'pairranker'"
            )


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

    def __init__(
        self, model_path: str, *, backbone: str = "", device: str = "auto", batch_size: int = 8
    ):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        local = Path(model_path)
        if local.exists() and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"ranking.model_path={model_path} has no config.json: not an llm-blender ranker "
                "folder (expected config.json + model.safetensors or pytorch_model.bin)"
            )
        if backbone and not Path(backbone).is_dir():
            raise FileNotFoundError(
                f"ranking.backbone={backbone} is not a folder; download the DeBERTa backbone "
                "(e.g. microsoft/deberta-v3-large) and point ranking.backbone at it, or set "
                "ranking.backbone='' to use the name in the ranker's config.json"
            )
        _check_pairrm_path(model_path)
        llm_blender = import_llm_blender()
        self.blender = llm_blender.Blender(
            blender_config=llm_blender.BlenderConfig(device=self.device, use_tqdm=False)
        )
        kwargs = {"model_name": backbone} if backbone else {}
        try:
            # load_checkpoint=None: llm-blender builds the ranker but does not read its weights
            # (it would torch.load pytorch_model.bin without weights_only, which
            # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a plain unpickle); they are read
            # below, without running anything a file asks for.
            self.blender.loadranker(model_path, device=self.device, load_checkpoint=None, **kwargs)
        except Exception as exc:
            hint = (
                ""
                if local.exists()
                else (
                    f" ({model_path} is not a local folder: llm-blender tries the hub, which fails "
                    "offline; download it once and set ranking.model_path to the folder)"
                )
            )
            raise RankerError(
                f"loading the PairRM ranker from {model_path} failed: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc
        if self.blender.ranker_config.ranker_type != "pairranker":
            raise RankerError(
                f"{model_path} is a {self.blender.ranker_config.ranker_type!r} "
                "ranker; PairRMRanker needs ranker_type 'pairranker'"
            )
        # Where llm-blender found the folder: the local path, else its download cache.
        folder = (
            local if local.exists() else Path(self.blender.ranker_config.cache_dir) / model_path
        )
        self._load_weights(folder)

    def _load_weights(self, folder: Path) -> None:
        """The ranker's weights from ``model.safetensors``, else ``pytorch_model.bin`` through
        the restricted unpickler (``selm_mcore.runtime.pickles``, whatever torch's settings);
        every weight of the model built from the backbone must be there (llm-blender would load
        with strict=False and only log what is missing: random weights would rank)."""
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            try:
                weights = load_file(str(folder / "model.safetensors"))
            except Exception as exc:  # safetensors' own error types; a torn or foreign file
                raise RankerError(
                    f"loading the PairRM ranker from {folder} failed: model.safetensors is not a "
                    f"readable safetensors file ({type(exc).__name__}: {exc}); download the "
                    "ranker again"
                ) from exc
        elif (folder / "pytorch_model.bin").is_file():
            from selm_mcore.runtime.pickles import load_torch_weights  # imports torch

            weights = load_torch_weights(folder / "pytorch_model.bin")
        else:
            raise RankerError(
                f"ranker folder {folder} holds neither model.safetensors nor pytorch_model.bin"
            )
        result = self.blender.ranker.load_state_dict(weights, strict=False)
        missing = sorted(result.missing_keys)
        if missing:
            raise RankerError(
                f"ranker checkpoint {folder} lacks {len(missing)} weights of the "
                f"model built from its backbone (first: {missing[:3]}); the "
                "backbone (ranking.backbone) does not match the checkpoint"
            )
        if result.unexpected_keys:
            logger.warning(
                "ranker checkpoint %s holds %d weights the model does not use (first: %s)",
                folder,
                len(result.unexpected_keys),
                result.unexpected_keys[:3],
            )

    counts_batches = True

    def _scores(self, prompts, candidates, answers):
        # One Blender.rank call per batch (the batches its DataLoader would make), so progress
        # is counted as the batches finish.
        out = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            out.append(
                self.blender.rank(
                    prompts[start:end],
                    candidates[start:end],
                    return_scores=True,
                    batch_size=self.batch_size,
                    disable_tqdm=True,
                )
            )
            self._count(len(out[-1]))
        return np.concatenate(out, axis=0)


class RewardModelRanker(Ranker):
    """Any HF sequence-classification reward model: score = logit 0 of the chat-templated
    [user: prompt, assistant: response] conversation. A tokenizer without a chat template gets
    the (prompt, response) text pair instead (the DeBERTa reward-model convention)."""

    name = "reward_model"

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        batch_size: int = 8,
        max_length: int = 2048,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(model_path).is_dir():
            raise FileNotFoundError(
                f"ranking.model_path={model_path} is not a local folder with "
                "an HF sequence-classification model"
            )
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        )
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                model_path,
                trust_remote_code=trust_remote_code,
                dtype=torch.bfloat16 if self.device.startswith("cuda") else torch.float32,
            )
            .to(self.device)
            .eval()
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _encode(self, prompt: str, response: str) -> list[int]:
        if self.tokenizer.chat_template:
            text = render_chat_template(  # within the template budget
                self.tokenizer,
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, response)["input_ids"]
        return ids[-self.max_length :]

    def _scores(self, prompts, candidates, answers):
        import torch

        flat = [self._encode(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        out = []
        with torch.no_grad():
            for start in range(0, len(flat), self.batch_size):
                batch = self.tokenizer.pad(
                    {"input_ids": flat[start : start + self.batch_size]}, return_tensors="pt"
                )
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                ).logits
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
            missing = (
                0
                if answers is None
                else next(i for i, a in enumerate(answers) if a is None or str(a).strip() == "")
            )
            raise RankerError(
                f"verifiable ranker: prompt {missing} has no answer; every row "
                "needs a non-empty 'answer' field (ranking.kind=verifiable)"
            )
        return np.array(
            [
                [1.0 + 1.0 / (1 + len(c)) if self.is_correct(c, a) else 0.0 for c in cands]
                for cands, a in zip(candidates, answers)
            ]
        )


def build_ranker(cfg: RankingConfig, *, trust_remote_code: bool = False) -> Ranker:
    """The ranker named by ``ranking.kind``."""
    if cfg.kind == "pairrm":
        return PairRMRanker(
            cfg.model_path, backbone=cfg.backbone, device=cfg.device, batch_size=cfg.batch_size
        )
    if cfg.kind == "reward_model":
        return RewardModelRanker(
            cfg.model_path,
            device=cfg.device,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            trust_remote_code=trust_remote_code,
        )
    if cfg.kind == "verifiable":
        return VerifiableAnswerRanker()
    raise ValueError(f"ranking.kind={cfg.kind!r} is not one of pairrm, reward_model, verifiable")
