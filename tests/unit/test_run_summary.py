"""The end of ``fpo-train``: a short summary (`fpo.commands.summary`), and only known noise
silenced (`fpo.commands.common.quiet_known_noise`)."""

from __future__ import annotations

import logging
import warnings

from fpo.commands.common import LIGHTNING_LOGGERS, quiet_known_noise
from fpo.commands.summary import run_summary

METRICS = {
    "train/loss": 0.6,
    "val/loss": 0.69,
    "val/rewards/accuracies": 0.5,
    "val/rewards/margins": 0.01,
    "val/logps/chosen": -40.0,
}


def test_summary_of_a_run_without_evaluation_names_its_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    text = run_summary(
        METRICS, tmp_path, "val/rewards/margins", resume="fpo-train x ckpt_path=last"
    )
    assert text.splitlines() == [
        f"run finished: {tmp_path}",
        "  validation  val/rewards/margins 0.010, val/loss 0.690, val/rewards/accuracies 0.500",
        f"  metrics     {tmp_path / 'metrics.json'}",
        f"  checkpoint  {tmp_path / 'checkpoints' / 'last.ckpt'}",
        "  continue    fpo-train x ckpt_path=last  (with a larger trainer.max_epochs)",
    ]


def test_summary_with_evaluation_and_policy_and_no_checkpoint(tmp_path):
    """No last.ckpt (callbacks=none): nothing to continue from, so no command for it."""
    (tmp_path / "policy").mkdir()
    metrics = {**METRICS, "eval/win_rate": 0.75, "eval/win_rate_stderr": 0.05, "eval/kl": 2.5}
    lines = run_summary(metrics, tmp_path, resume="fpo-train y ckpt_path=last").splitlines()
    assert lines[2] == (
        f"  evaluation  win rate 0.750 ± 0.050, KL 2.500 "
        f"({tmp_path / 'evaluation' / 'summary.json'})"
    )
    assert lines[-1] == f"  policy      {tmp_path / 'policy'}  (fpo-eval run_dir={tmp_path})"
    unevaluated = run_summary(METRICS, tmp_path, has_evaluation=False).splitlines()[-1]
    assert unevaluated.endswith(f"(fpo-eval run_dir={tmp_path} evaluation=smoke)")
    assert not any("checkpoint" in line or "continue" in line for line in lines)


def test_only_known_warnings_and_lightning_tips_are_silenced(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        for message, category in [
            ("Found 3 module(s) in eval mode at the start of training.", UserWarning),
            ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning),
            ("Found 3 module(s) in eval mode", DeprecationWarning),  # another category
            ("something else", UserWarning),
        ]:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in seen] == ["Found 3 module(s) in eval mode", "something else"]
    with caplog.at_level(logging.INFO):
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).info("💡 Tip: For seamless cloud logging, try litlogger")
            logging.getLogger(name).info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"] * 2
