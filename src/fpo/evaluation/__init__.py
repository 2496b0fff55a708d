"""Evaluation of a trained policy against its reference on held-out prompts.

The reward-vs-KL frontier (docs/results.md): fresh samples from the policy and from
the reference, scored by a judge (mean score, win rate), and a Monte-Carlo estimate of
``KL(policy || reference)`` from the policy's own samples.

- `sampling`: seeded samples whose token ids are exactly what the sampler drew (EOS kept).
- `scoring`: batched sequence log-probs and the log-ratios of the KL estimate.
- `stats`: per-prompt means, standard errors and pairwise win rates.
- `sentiment`: `evaluate_sentiment`, the controlled-sentiment evaluation.
- `reference_side`: the reference's samples and pair statistics, kept across runs.
- `report`: `write_evaluation` (summary.json, generations.jsonl, plot) and `format_summary`.
"""

from fpo.evaluation.report import format_summary, plot_judge_vs_kl, write_evaluation
from fpo.evaluation.sampling import Samples, sample_for_scoring
from fpo.evaluation.scoring import kl_log_ratios, scoring_batch, sequence_logprob
from fpo.evaluation.sentiment import evaluate_sentiment
from fpo.evaluation.stats import grouped_mean_stderr, pairwise_wins

__all__ = [
    "Samples",
    "evaluate_sentiment",
    "format_summary",
    "grouped_mean_stderr",
    "kl_log_ratios",
    "pairwise_wins",
    "plot_judge_vs_kl",
    "sample_for_scoring",
    "scoring_batch",
    "sequence_logprob",
    "write_evaluation",
]
