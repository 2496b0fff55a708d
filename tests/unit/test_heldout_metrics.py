"""Evaluation metrics on hand-made cases with known answers: entropy, accuracy, drift,
win rates of biased judges, the feature report."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fpo.evaluation import evaluate_sentiment, scoring_batch
from fpo.evaluation.features import context_text, feature_rows, format_feature_report
from fpo.evaluation.heldout import FeatureShift, heldout_pair_metrics
from fpo.logprobs import response_token_stats
from fpo.objective import build_objective
from fpo.sae import build_random_sae, sae_hook_name

PAD, A, B = 0, 70, 71  # byte tokens of the tiny tokenizer
PROMPTS = ["I watched The Glass Road and", "The film is", "Overall, it"]


def _biased(model: torch.nn.Module, token: int, bias: float) -> torch.nn.Module:
    """A copy of ``model`` whose LM head adds ``bias`` to ``token``'s logit."""
    other = copy.deepcopy(model)
    boost = torch.zeros(model.config.vocab_size)
    boost[token] = bias
    other.get_output_embeddings().register_forward_hook(lambda m, args, out: out + boost)
    return other


def _uniform(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose LM head returns all-zero logits (a uniform distribution)."""
    other = copy.deepcopy(model)
    other.get_output_embeddings().register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    return other


def _pairs(chosen: list[int], rejected: list[int], n: int = 3) -> list[dict]:
    """``n`` pairs in the training batch layout (rows chosen then rejected), one batch."""
    prompts = [[1, 40 + i, 41 + i] for i in range(n)]
    return [scoring_batch(prompts + prompts, [chosen] * n + [rejected] * n, PAD)]


def _sae(model: torch.nn.Module):
    sae = build_random_sae(d_sae=64, k=8, model=model)
    return sae, sae_hook_name(sae)


# --------------------------------------------------------------------------- entropy


def test_entropy_of_a_uniform_head_is_log_vocab():
    vocab = 50
    hidden, weight = torch.randn(7, 4), torch.randn(4, vocab)
    stats = response_token_stats(
        hidden, lambda h: torch.zeros(h.shape[0], vocab), torch.arange(7), 3,
        ref_hidden=hidden, ref_head=lambda h: h @ weight, entropy=True,
    )  # fmt: skip
    assert torch.allclose(stats.policy_entropy, torch.full((7,), math.log(vocab)))
    assert torch.allclose(stats.policy_logps, torch.full((7,), -math.log(vocab)))
    assert (stats.ref_entropy < math.log(vocab)).all()


def test_heldout_entropy_of_uniform_policy_is_log_vocab(tiny_model):
    policy = _uniform(tiny_model)
    metrics, _ = heldout_pair_metrics(
        policy, tiny_model, _pairs([A, A, B], [B, B, A]), build_objective({"margin": "dpo"})
    )
    assert metrics["entropy"] == pytest.approx(math.log(tiny_model.config.vocab_size), abs=1e-5)
    assert metrics["entropy_stderr"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reference_entropy"] < metrics["entropy"]


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("margin", ["dpo", "ln_dpo", "simpo"])
def test_accuracy_on_pairs_with_a_known_answer(tiny_model, margin):
    """The policy puts its extra mass on token A: pairs whose chosen response is A-heavy are
    all right (accuracy 1), the same pairs swapped all wrong (0), for every margin."""
    policy = _biased(tiny_model, A, 8.0)
    objective = build_objective({"margin": margin, "beta": 0.1})
    right, _ = heldout_pair_metrics(policy, tiny_model, _pairs([A] * 4, [B] * 4), objective)
    wrong, _ = heldout_pair_metrics(policy, tiny_model, _pairs([B] * 4, [A] * 4), objective)
    assert right["preference_accuracy"] == 1.0 and wrong["preference_accuracy"] == 0.0
    assert right["implicit_reward_accuracy"] == 1.0 and wrong["implicit_reward_accuracy"] == 0.0
    assert right["heldout_pairs"] == 3


def test_accuracy_counts_ties_half_and_drift_is_zero_for_identical_models(tiny_model):
    sae, hook = _sae(tiny_model)
    objective = build_objective(
        {"margin": "ln_dpo", "constraints": {"features": {"alpha": 0.5, "k": 8}}}
    )
    reference = copy.deepcopy(tiny_model)
    metrics, shift = heldout_pair_metrics(
        tiny_model, reference, _pairs([A, B, A], [B, A, B]), objective, sae=sae, hook_name=hook
    )
    assert metrics["preference_accuracy"] == 0.5  # every pair ties
    assert metrics["implicit_reward_accuracy"] == 0.5
    assert metrics["feature_drift"] == 0.0 and metrics["feature_drift_k"] == 50
    assert metrics["entropy"] == pytest.approx(metrics["reference_entropy"])
    assert torch.equal(shift.mean_change(), torch.zeros(64, dtype=torch.float64))


def test_feature_drift_is_positive_when_the_hooked_layer_changes(tiny_model):
    sae, hook = _sae(tiny_model)
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        policy.model.layers[-1].mlp.down_proj.weight.add_(0.5)
    metrics, _ = heldout_pair_metrics(
        policy, tiny_model, _pairs([A, B], [B, A]), build_objective({"margin": "dpo"}),
        sae=sae, hook_name=hook, drift_k=8,
    )  # fmt: skip
    assert metrics["feature_drift"] > 0 and metrics["feature_drift_k"] == 8


def test_tdpo_implicit_reward_uses_the_token_kl(tiny_model):
    """TDPO's rewards include the sequential KL: on identical models it is 0, so a tie."""
    objective = build_objective({"margin": "dpo", "constraints": {"token_kl": {"alpha": 1.0}}})
    metrics, _ = heldout_pair_metrics(
        tiny_model, copy.deepcopy(tiny_model), _pairs([A], [B]), objective
    )
    assert metrics["implicit_reward_accuracy"] == 0.5


# --------------------------------------------------------------------------- judges


class ConstantJudge:
    name = "constant"

    def score(self, prompts, completions):
        return [0.25] * len(completions)


class AlwaysFirst:
    """A pairwise judge that prefers its first argument (the policy) every time."""

    name = "always-first"

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def compare(self, prompts, first, second):
        return [self.value] * len(first)


def test_win_rate_of_judges_that_always_prefer_one_side(tiny_model, tiny_tokenizer):
    result = evaluate_sentiment(
        tiny_model, tiny_model, tiny_tokenizer, PROMPTS,
        {"const": ConstantJudge(), "first": AlwaysFirst(1.0), "second": AlwaysFirst(0.0)},
        num_samples=2, max_new_tokens=3,
    )  # fmt: skip
    blocks = result["judges"]
    assert blocks["first"]["win_rate"] == 1.0 and blocks["second"]["win_rate"] == 0.0
    assert blocks["const"]["win_rate"] == 0.5  # equal scores tie: half
    assert result["win_rate"] == 0.5 and result["policy_judge_mean"] == 0.25  # the main judge
    assert result["settings"]["judges"] == ["constant", "always-first", "always-first"]
    first = result["generations"][0]  # pairwise judges have no per-sample scores
    assert first["policy_scores"] == first["reference_scores"] == {"constant": 0.25}


def test_pairwise_main_judge_is_refused(tiny_model, tiny_tokenizer):
    from fpo.errors import UserError

    with pytest.raises(UserError, match="main"):
        evaluate_sentiment(tiny_model, tiny_model, tiny_tokenizer, PROMPTS, [AlwaysFirst()])


# --------------------------------------------------------------------------- feature report


def test_feature_report_ranks_by_absolute_change_with_contexts(tiny_tokenizer):
    """Feature 2 rises by 3 (largest), feature 0 falls by 2: ranks 1 and 2; contexts come
    from the policy for the rise, from the reference for the fall."""
    shift = FeatureShift(d_sae=4, contexts=2)
    ids = torch.tensor([tiny_tokenizer("xabcdefg")["input_ids"]])
    rows, cols = torch.zeros(3, dtype=torch.long), torch.tensor([3, 4, 5])
    policy = torch.zeros(3, 4)
    policy[1, 2] = 9.0  # feature 2 fires on token at col 4 under the policy
    reference = torch.zeros(3, 4)
    reference[2, 0] = 6.0  # feature 0 fires on col 5 under the reference
    shift.update(
        ids, torch.ones_like(ids), rows, cols, {"policy": policy, "ref": reference},
        {"policy": policy.mean(0, keepdim=True), "ref": reference.mean(0, keepdim=True)},
    )  # fmt: skip
    top = feature_rows(shift, tiny_tokenizer, top_n=2, before=2, after=1)
    assert [row["feature"] for row in top] == [2, 0]
    assert top[0]["change"] == pytest.approx(3.0) and top[1]["change"] == pytest.approx(-2.0)
    # ids = <bos> x a b c d ...: col 4 is "c", col 5 is "d"
    assert top[0]["contexts"] == [{"activation": 9.0, "text": "ab[[c]]d"}]
    assert top[1]["contexts_from"] == "reference"
    assert top[1]["contexts"][0]["text"] == "bc[[d]]e"
    text = format_feature_report(top, {"sae": "s", "hook_name": "h"})
    assert "| 1 | 2 | +3 |" in text and "`ab[[c]]d`" in text
    assert context_text(tiny_tokenizer, ids[0].tolist(), 1, 5, 0) == "<bos>[[x]]"


def test_feature_shift_keeps_the_top_activations_across_batches(tiny_tokenizer):
    shift = FeatureShift(d_sae=1, contexts=2)
    for values in ([1.0, 5.0], [3.0, 0.5]):
        ids = torch.tensor([[1, 40, 41]])
        acts = torch.tensor(values).unsqueeze(1)
        shift.update(
            ids, torch.ones_like(ids), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]),
            {"policy": acts, "ref": acts}, {"policy": acts.mean(0, keepdim=True),
                                            "ref": acts.mean(0, keepdim=True)},
        )  # fmt: skip
    best, where = shift.top["policy"]
    assert best[:, 0].tolist() == [5.0, 3.0]
    assert [shift.positions[i] for i in where[:, 0].tolist()] == [(0, 2), (1, 1)]
