"""The model card rendered from plain values (`fpo.model_card`) and the config extraction of
the entry point (`fpo.commands.card`), without a training run."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf

from fpo.commands.card import base_model, sae_label, saved_command
from fpo.model_card import (
    NOT_EVALUATED,
    CardValues,
    DataValues,
    TrainingValues,
    hub_id,
    refresh_card_evaluation,
    render_card,
    write_model_card,
)
from fpo.testing import preset

TRAINING = TrainingValues(
    optimizer="AdamW",
    learning_rate=5e-7,
    weight_decay=0.0,
    scheduler="get_constant_schedule_with_warmup",
    warmup_steps=150,
    global_batch_size=128,
    epochs=1,
    steps=480,
    precision="bf16-mixed",
    seed=3,
    reference="cached",
    sae="gemma-scope-2b-pt-res/layer_25/width_16k/average_l0_55",
    hook="blocks.25.hook_resid_post",
)
HUB_DATA = DataValues(
    train_source="HuggingFaceH4/ultrafeedback_binarized",
    train_split="train_prefs",
    train_pairs=61135,
    val_source="HuggingFaceH4/ultrafeedback_binarized",
    val_split="test_prefs",
    val_pairs=1000,
    format="ultrafeedback",
)


def values(objective="fpo", data=HUB_DATA, **kwargs) -> CardValues:
    return CardValues(
        objective=preset(objective, "sae=gemma_scope_2b_l25"),
        model="gemma2_2b",
        training=TRAINING,
        data=data,
        **{"base_model": "google/gemma-2-2b", **kwargs},
    )


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_names_library_tags_base_model_and_hub_dataset():
    meta = front_matter(render_card(values()))
    assert meta == {
        "library_name": "transformers",
        "tags": ["fpo-template", "fpo", "preference-optimization"],
        "base_model": "google/gemma-2-2b",
        "datasets": ["HuggingFaceH4/ultrafeedback_binarized"],
    }


def test_local_data_and_unknown_base_model_stay_out_of_the_front_matter(tmp_path):
    local = DataValues(train_source=str(tmp_path / "secret" / "pairs.jsonl"), train_split="train",
                       train_pairs=8)  # fmt: skip
    card = render_card(values("dpo", data=local, base_model=None))
    meta = front_matter(card)
    assert "datasets" not in meta and "base_model" not in meta
    assert meta["tags"][1] == "dpo"
    assert "local `pairs.jsonl`, 8 pairs" in card and "secret" not in card  # no folders shown


def test_body_states_objective_and_hyperparameters():
    card = render_card(values())
    for text in (
        "## Objective: `fpo`",
        "`ln_dpo`",
        "| beta | 0.1 |",
        "| SAE feature term (FPO) | alpha 0.5, k 50, stop-gradient yes |",
        "| optimizer | AdamW |",
        "| learning rate | 5e-07 |",
        "| scheduler | get_constant_schedule_with_warmup, 150 warm-up steps |",
        "| global batch size | 128 pairs per optimizer step |",
        "| optimizer steps | 480 |",
        "| precision | bf16-mixed |",
        "| seed | 3 |",
        "| reference | cached:",
        "at `blocks.25.hook_resid_post`",
        "train: hub dataset `HuggingFaceH4/ultrafeedback_binarized`, split `train_prefs`, 61135",
        NOT_EVALUATED,
        "Not recorded",  # no command
    ):
        assert text in card, text
    assert "token KL" not in card


def test_tdpo_and_simpo_terms():
    tdpo = render_card(values("tdpo1"))
    assert "| token KL term (TDPO) | alpha 1.0, stop-gradient no |" in tdpo
    assert "SAE feature term" not in tdpo
    simpo = render_card(values("simpo"))
    assert "| gamma_beta_ratio | 0.5 |" in simpo and "| constraint terms | none |" in simpo


def test_hub_ids_are_owner_slash_name_and_not_local(tmp_path, monkeypatch):
    assert hub_id("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)  # an owner/name that is a local folder
    for local in ("data/train.jsonl", "./x/y", "/abs/path", "plain", "models/mine"):
        assert hub_id(local) is None, local


SUMMARY = {
    "num_prompts": 4, "num_samples": 2, "seed": 0, "heldout_pairs": 7,
    "settings": {"temperature": 1.0, "max_new_tokens": 8},
    "kl": 0.0789, "kl_stderr": 0.1, "preference_accuracy": 0.857,
    "preference_accuracy_stderr": 0.143,
    "judges": {
        "vader": {"policy_judge_mean": 0.25, "policy_judge_stderr": 0.05,
                  "reference_judge_mean": 0.125, "reference_judge_stderr": 0.04,
                  "win_rate": 0.625, "win_rate_stderr": 0.1},
        "llm": {"win_rate": 0.75, "win_rate_stderr": 0.2},
    },
}  # fmt: skip


def test_refresh_puts_the_summary_in_the_evaluation_block_only(tmp_path):
    policy = tmp_path / "run" / "policy"
    card = write_model_card(policy, values())
    before = card.read_text()
    assert not refresh_card_evaluation(policy)  # no summary yet: untouched
    assert card.read_text() == before
    (tmp_path / "run" / "evaluation").mkdir()
    (tmp_path / "run" / "evaluation" / "summary.json").write_text(json.dumps(SUMMARY))
    assert refresh_card_evaluation(policy)
    after = card.read_text()
    assert NOT_EVALUATED not in after
    assert "| vader | 0.25 ± 0.05 | 0.125 ± 0.04 | 0.625 ± 0.1 |" in after
    assert "| llm | - | - | 0.75 ± 0.2 |" in after  # a pairwise judge: win rate only
    assert "KL(policy ‖ reference): 0.0789 ± 0.1 nats" in after
    assert "preference accuracy 0.857 ± 0.14" in after
    # everything outside the block is unchanged, and a second refresh changes nothing
    head, tail = before.split("## Evaluation")[0], before.split("<!-- /fpo-template")[1]
    assert after.startswith(head) and after.endswith(tail)
    assert refresh_card_evaluation(policy) and card.read_text() == after


def test_config_extraction_base_model_sae_and_command(tmp_path):
    hub = OmegaConf.create({"loader": {"name_or_path": "google/gemma-2-2b"}})
    assert base_model(hub) == "google/gemma-2-2b"
    local = OmegaConf.create({"loader": {"name_or_path": str(tmp_path)}})
    assert base_model(local) is None
    explicit = OmegaConf.create({"base_model": "google/gemma-3-270m", "loader": {}})
    assert base_model(explicit) == "google/gemma-3-270m"
    assert sae_label(OmegaConf.create({"path": "/x/assets/sae/l17", "_target_": "a.b"})) == "l17"
    assert sae_label(OmegaConf.create({"_target_": "fpo.sae.build_random_sae"})) == (
        "build_random_sae"
    )
    assert saved_command(tmp_path) is None
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- objective=fpo\n- tags=[a, b]\n")
    assert saved_command(tmp_path) == "fpo-train objective=fpo 'tags=[a, b]'"
