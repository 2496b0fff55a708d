"""Evaluation of a trained policy against its reference on held-out prompts.

The reward-vs-KL frontier (docs/results.md): fresh samples from the policy and from
the reference, scored by a judge (mean score, win rate), and a Monte-Carlo estimate of
``KL(policy || reference)`` from the policy's own samples.

- `sampling`: seeded samples whose token ids are exactly what the sampler drew (EOS kept).
- `scoring`: batched sequence log-probs and the log-ratios of the KL estimate.
- `stats`: per-prompt means, standard errors and pairwise win rates.
- `sentiment`: `evaluate_sentiment`, the controlled-sentiment evaluation.
- `reference_side`: the reference's samples and pair statistics, kept across runs.
- `report`: `write_evaluation` (summary.json, generations.jsonl, plot), `read_generations`
  and `format_summary`.

Its names are imported on first use (PEP 562), so a command that needs one light submodule
(``fpo-judge-check``: `judge_check`) does not load torch with the package.
"""

from __future__ import annotations

from fpo.lazy import lazy_exports

#: name -> the submodule that defines it
EXPORTS = {
    "Samples": "sampling",
    "evaluate_sentiment": "sentiment",
    "format_summary": "report",
    "grouped_mean_stderr": "stats",
    "kl_log_ratios": "scoring",
    "pairwise_wins": "stats",
    "plot_judge_vs_kl": "report",
    "read_generations": "report",
    "sample_for_scoring": "sampling",
    "scoring_batch": "scoring",
    "sequence_logprob": "scoring",
    "write_evaluation": "report",
}
__all__ = sorted(EXPORTS)

__getattr__ = lazy_exports(__name__, EXPORTS)
