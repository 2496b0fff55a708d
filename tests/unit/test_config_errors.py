"""Did-you-mean for configs that do not compose (`fpo.commands.config_errors`): the closest
real names for a misspelt group, option or key (nested too), never Hydra's ``+key`` advice,
and every suggestion composes."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import fpo.objective  # noqa: F401  (registers objective_schema, the presets' base)
from fpo.commands.common import CONFIG_DIR
from fpo.commands.config_errors import explain


def compose_train(overrides: list[str]) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        compose(config_name="train", overrides=overrides)


def message_for(overrides: list[str]) -> str:
    with pytest.raises(Exception) as caught:
        compose_train(overrides)
    message = explain(caught.value, overrides, CONFIG_DIR)
    assert message is not None, caught.value
    return message


def suggestions(message: str) -> list[str]:
    found = re.search(r"Did you mean (.*?)\?", message)
    return found.group(1).split(" or ") if found else []


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("objective=fpoo", "objective=fpo"),  # an option of a group
        ("objectve=dpo", "objective=dpo"),  # a group name
        ("objjective=fpoo", "objective=fpo"),  # both
        ("experimen=smoke", "experiment=smoke"),  # a group with no option by default
        ("experiment=ablaton/k", "experiment=ablation/k"),  # an option in a subgroup
        ("objective.bta=0.2", "objective.beta=0.2"),  # a key of a structured config
        ("trainer.max_epoch=2", "trainer.max_epochs=2"),  # a key of a plain dict
        ("seeed=3", "seed=3"),  # a top-level key
        ("objective.constraints.featres.k=8", "objective.constraints.features.k=8"),
        ("objective.constraints.featres.kk=8", "objective.constraints.features.k=8"),
        ("step.global_batch=4", "step.global_batch_size=4"),
    ],
)
def test_a_misspelling_gets_the_closest_name_and_the_suggestion_composes(typed, expected):
    message = message_for(["experiment=smoke", typed])
    assert message.startswith(f"{typed}:"), message
    assert "+" not in message, message  # no "use +key", which fails later
    offered = suggestions(message)
    assert offered[0] == expected, message
    for suggestion in offered:
        compose_train(["experiment=smoke", suggestion])


def test_no_close_name_lists_the_real_ones():
    message = message_for(["objective.zzzzz=1"])
    assert not suggestions(message)
    assert "Keys at objective: beta, constraints, gamma_beta_ratio, margin, name." in message


def test_a_misspelt_group_with_an_unknown_option_suggests_nothing_that_fails():
    message = message_for(["objectve=zzzz"])
    assert not suggestions(message)  # objective=zzzz would not compose
    assert "Config groups: callbacks, data," in message


def test_a_key_of_a_group_with_no_option_says_to_choose_one():
    message = message_for(["evaluation.num_prompts=3"])
    assert "evaluation is a config group and none of its options is chosen" in message
    assert "sentiment, smoke" in message
    compose_train(["evaluation=smoke", "evaluation.num_prompts=3"])


def test_a_sweep_keeps_its_other_values():
    """``objective=dpo,fpoo`` (a multirun's sweep) -> ``objective=dpo,fpo``."""
    overrides = ["objective=dpo,fpoo"]
    with pytest.raises(Exception) as caught:
        compose_train(["objective=fpoo"])  # what the sweeper composes for that job
    assert suggestions(explain(caught.value, overrides, CONFIG_DIR)) == ["objective=dpo,fpo"]


def test_other_errors_are_left_to_hydra():
    with pytest.raises(Exception) as caught:
        compose_train(["objective.beta=abc"])
    assert explain(caught.value, ["objective.beta=abc"], CONFIG_DIR) is None
