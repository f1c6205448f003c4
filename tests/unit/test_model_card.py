"""The model card of an exported policy (selm_mcore.loop.model_card): what it states, read
back from the markdown, against the config and a metrics file written here."""

from __future__ import annotations

import json

from selm_mcore.config.io import load_config
from selm_mcore.loop.model_card import render_model_card


def test_the_card_states_base_round_settings_metrics_and_benchmarks(tmp_path):
    base = tmp_path / "Meta-Llama-3-8B-Instruct"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct"})
    )
    train = tmp_path / "train"
    train.mkdir()
    metrics = [
        {"step": 1, "loss": 0.6931, "rewards/chosen": 0.01, "rewards/rejected": -0.01,
         "rewards/accuracies": 0.5, "rewards/margins": 0.02},
        {"step": 2, "loss": 0.5, "rewards/chosen": 0.03, "rewards/rejected": -0.05,
         "rewards/accuracies": 1.0, "rewards/margins": 0.08},
    ]  # fmt: skip
    (train / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    cfg = load_config(
        None,
        [
            f"model.hf_dir={base}",
            "data.train_path=hf://HuggingFaceH4/ultrafeedback_binarized:train_prefs",
            "online.rounds=3",
            "optim.lr_per_round=[5e-7,3e-7,1e-7]",
            "online.eval=[alpaca_eval]",
            "online.workdir=/runs/selm-8b",
        ],
    )
    summary = {
        "benchmarks": {
            "alpaca_eval": {"win_rate": 62.5, "judged": 8, "mean_length": 1234.0,
                            "reference": "gpt4_turbo", "judge": "pairrm"}
        }
    }  # fmt: skip
    card = render_model_card(
        cfg,
        round_label="round 2",
        round_index=2,
        warmup=False,
        train_dir=train,
        eval_rows=[("start", summary), ("round 2", summary)],
    )
    front = card.split("---")[1]
    assert "base_model: meta-llama/Meta-Llama-3-8B-Instruct" in front
    assert "- HuggingFaceH4/ultrafeedback_binarized" in front
    assert "# selm-8b: the policy after round 2" in card
    assert "| training data | hf://HuggingFaceH4/ultrafeedback_binarized:train_prefs " in card
    assert "portion 2 of 3" in card
    assert "| learning rate | 3e-07 peak" in card  # round 2's entry of lr_per_round
    assert "alpha*beta = 1e-06" in card  # 1e-4 * 0.01
    assert "optimizer steps: 2; loss 0.6931 -> 0.5" in card
    assert "reward accuracy 0.75" in card
    assert "| round 2 | 62.5 (n=8) | 1234 | - |" in card
    pending = render_model_card(
        cfg, round_label="round 2", round_index=2, warmup=False, train_dir=train, eval_rows=None
    )
    assert "Pending: written by the round's report" in pending
