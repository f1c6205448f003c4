"""Special-token text inside the data (``<|im_end|>`` written in a prompt or a response), with
the real tiny ChatML tokenizer (``selm_mcore.testing.assets``): it is tokenised as plain text on
every path (training and reference-pass rows, generation prompts), the chat template's own
markers stay special tokens, and ``data.special_tokens_in_text`` (plain | refuse | skip) decides
what `selm train`, `selm generate` and `selm rank` do with such rows, counted in their logs.

References: the text decoded back from the ids (exactly the text), the ids of the special tokens
counted, and the prompt's ids assembled by hand from the ChatML template's pieces.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from selm_mcore import cli
from selm_mcore.config.schema import GenerationConfig
from selm_mcore.data.tokenize import encode_prompt, encode_response, render_prompt
from selm_mcore.rollout.vllm_engine import VLLMGenerator
from selm_mcore.runtime.files import read_records

QUOTING = "In ChatML a turn ends with <|im_end|> and the next opens with <|im_start|>."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does <|im_end|> mean?"},
]


def _ids(tokenizer, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(name)


def test_a_response_quoting_special_tokens_is_plain_text_then_one_eos(tiny_tokenizer):
    ids = encode_response(tiny_tokenizer, QUOTING)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert not set(ids[:-1]) & set(tiny_tokenizer.all_special_ids)  # no control token inside
    assert tiny_tokenizer.decode(ids[:-1]) == QUOTING
    plain = "It is 5."  # text without special-token text: the ids of before
    assert encode_response(tiny_tokenizer, plain) == tiny_tokenizer(
        plain, add_special_tokens=False
    )["input_ids"] + [tiny_tokenizer.eos_token_id]


def test_a_prompt_quoting_special_tokens_keeps_only_the_template_markers_special(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = encode_prompt(tok, MESSAGES)
    start, end = _ids(tok, "<|im_start|>"), _ids(tok, "<|im_end|>")
    assert ids.count(start) == 3 and ids.count(end) == 2  # system, user, generation prompt
    assert tok.decode(ids) == render_prompt(tok, MESSAGES)

    def piece(text):
        return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    by_hand = (
        [start, *piece("system\nYou are a helpful assistant."), end, *piece("\n")]
        + [start, *piece("user\nWhat does <|im_end|> mean?"), end, *piece("\n")]
        + [start, *piece("assistant\n")]
    )
    assert ids == by_hand
    clean = [{"role": "user", "content": "What is 2 plus 3?"}]  # no special-token text: as before
    assert (
        encode_prompt(tok, clean)
        == tok(render_prompt(tok, clean), add_special_tokens=False)["input_ids"]
    )


def test_generation_prompts_follow_the_same_rule(tiny_tokenizer):
    """The prompt ids vLLM is given (``VLLMGenerator.render_counted``, the real method on the
    real tokenizer; no engine needed to render) are the training prompt's ids."""
    generator = SimpleNamespace(
        tokenizer=tiny_tokenizer, cfg=GenerationConfig(max_model_len=512, max_tokens=24)
    )
    [(ids, cut)] = VLLMGenerator.render_counted(generator, [MESSAGES])
    assert cut == 0 and ids == encode_prompt(tiny_tokenizer, MESSAGES)
    assert ids.count(tiny_tokenizer.eos_token_id) == 2  # the system and user turns' ends only


@pytest.fixture
def special_rows(tmp_path, write_jsonl, preference_row):
    return write_jsonl(
        tmp_path / "rows.jsonl",
        [
            preference_row("What is 2 plus 3?", "It is 5.", "It is 6.", prompt_id="a"),
            preference_row("What ends a turn?", QUOTING, "No idea.", prompt_id="b"),
            preference_row("Tell me a story.", "Once there was a boy.", "No.", prompt_id="c"),
        ],
    )


def _train(write_config, tmp_path, tiny_llama_dir, rows, rule):
    config = write_config(
        tmp_path / f"{rule}.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={"train_path": str(rows), "special_tokens_in_text": rule},
        loss={"alpha": 0.0},
        train={"global_batch_size": 1, "ref_cache": str(tmp_path / "none.safetensors")},
    )
    return cli.main(["train", str(config)])


def test_selm_train_tokenises_refuses_or_skips_such_rows_and_counts_them(
    tmp_path, tiny_llama_dir, write_config, special_rows, capsys, caplog
):
    """`selm train` stops at the missing reference cache after tokenising: the log line counts
    the rows; refuse stops first, naming the row, the field and the token."""
    caplog.set_level("INFO")
    assert _train(write_config, tmp_path, tiny_llama_dir, special_rows, "plain") == 1
    assert "none.safetensors" in capsys.readouterr().err
    assert "tokenised 3 examples" in caplog.text
    assert "(data.special_tokens_in_text=plain): 1 rows tokenised as plain text" in caplog.text
    caplog.clear()
    assert _train(write_config, tmp_path, tiny_llama_dir, special_rows, "skip") == 1
    assert (
        "tokenised 2 examples" in caplog.text
        and "0 rows tokenised as plain text, 1 rows left out" in caplog.text
    )
    assert _train(write_config, tmp_path, tiny_llama_dir, special_rows, "refuse") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"selm train: error: {special_rows}:2: chosen holds the text of the special token "
        "'<|im_end|>', which would not be tokenised as that token "
        "(data.special_tokens_in_text=refuse). Fix:"
    ), err


def _generate(write_config, tmp_path, model, prompts, rule):
    config = write_config(
        tmp_path / f"gen_{rule}.yaml",
        data={"special_tokens_in_text": rule},
        generation={"max_model_len": 512, "max_tokens": 16},
    )
    out = tmp_path / f"gen_{rule}.jsonl"
    code = cli.main(
        [
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--model-dir",
            str(model),
        ]
    )
    return code, out


def test_selm_generate_refuses_or_skips_such_prompts_before_any_engine(
    tmp_path, tiny_llama_dir, write_config, write_jsonl, capsys, caplog
):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt_id": "b", "messages": MESSAGES}, {"prompt_id": 7, "prompt": "Say <|im_start|>"}],
    )
    code, out = _generate(write_config, tmp_path, tiny_llama_dir, prompts, "refuse")
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"selm generate: error: {prompts} row 1 (prompt_id 'b'): message 1 (user) holds the text "
        "of the special token '<|im_end|>'"
    ), err
    caplog.set_level("INFO")
    code, out = _generate(write_config, tmp_path, tiny_llama_dir, prompts, "skip")
    assert code == 0 and "vLLM engine" not in caplog.text  # every prompt left out: no engine
    assert [(r["prompt_id"], r["responses"], "skipped" in r) for r in read_records(out)] == [
        ("b", [], True),
        ("7", [], True),
    ]
    assert "(data.special_tokens_in_text=skip): 2 prompts, 2 left out" in caplog.text


def test_selm_rank_leaves_out_rows_whose_prompt_generate_skipped(
    tmp_path, write_config, write_jsonl, special_rows, caplog
):
    rows = [{**row, "answer": "5"} for row in read_records(special_rows)]  # the ranker's key
    special_rows = write_jsonl(special_rows, rows)
    config = write_config(tmp_path / "rank.yaml", ranking={"kind": "verifiable"})
    generations = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt_id": "a", "responses": ["It is 5"]},
            {"prompt_id": "b", "responses": [], "skipped": "special-token text"},
            {"prompt_id": "c", "responses": ["A boy."]},
        ],
    )
    out = tmp_path / "pairs.jsonl"
    args = ["rank", str(config), "--generations", str(generations), "--rows", str(special_rows)]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()] == ["a", "c"]
    assert f"{special_rows}: left out 1 rows whose prompt selm generate skipped" in caplog.text


@pytest.mark.parametrize("chat_format", ["zephyr", "phi3"])
def test_a_tokenizer_that_adds_a_bos_gets_one_in_front_of_a_quoting_prompt(tmp_path, chat_format):
    """The Llama-style tokenizers of Mistral/Zephyr and Phi-3 put their BOS in front of every
    text: a prompt quoting the EOS text gets that one BOS, the template's markers as special
    tokens and the quoted text as plain text; the piece-by-piece encoding of a prompt without
    such text equals the tokenizer's own encoding of the whole rendered text."""
    from transformers import AutoTokenizer

    from selm_mcore.data.special_tokens import SpecialTokenText, encode_prompt_plain
    from selm_mcore.testing.assets import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path, chat_format=chat_format)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    quoting = [{"role": "user", "content": f"Is {tok.eos_token} the end?"}]
    ids = encode_prompt(tok, quoting)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == render_prompt(tok, quoting)
    template_eos = render_prompt(tok, quoting).count(tok.eos_token) - 1  # less the quoted one
    assert ids.count(tok.eos_token_id) == template_eos
    clean = [{"role": "user", "content": "What is 2 plus 3?"}]
    whole = tok(render_prompt(tok, clean), add_special_tokens=False)["input_ids"]
    assert encode_prompt_plain(tok, clean, SpecialTokenText(tok), render_prompt) == whole
    assert encode_prompt(tok, clean) == [tok.bos_token_id, *whole]
