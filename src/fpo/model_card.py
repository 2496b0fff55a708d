"""The model card: ``README.md`` beside a saved policy, in the Hugging Face hub's format.

A card is YAML front matter (``library_name``, ``tags``, ``base_model`` and ``datasets`` when
they name hub repositories) followed by markdown: the objective, the hyperparameters that
matter, the data, the evaluation summary and the command that produced the run. It is
rendered from plain values (:class:`CardValues`), never from a Hydra config; the entry point
``fpo-train`` extracts them (`fpo.commands.card`).

The evaluation runs after the policy is saved, so the card is first written with "not
evaluated" and its evaluation block (between :data:`EVALUATION_START` and
:data:`EVALUATION_END`) is replaced from ``<run>/evaluation/summary.json`` once there is one
(:func:`refresh_card_evaluation`: after the evaluation of ``fpo-train``, and by ``fpo-push``
before uploading, so a later ``fpo-eval run_dir=`` is reflected too).

Local data files appear by file name only: a card is meant to be published, and a full path
would show the author's folders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fpo.atomic import atomic_save_bytes
from fpo.objective import Margin, Objective

CARD_FILE = "README.md"
EVALUATION_DIR = "evaluation"
EVALUATION_START = "<!-- fpo-template:evaluation -->"
EVALUATION_END = "<!-- /fpo-template:evaluation -->"
NOT_EVALUATED = "Not evaluated."

_MARGINS = {
    Margin.dpo: "DPO's, on summed log-probs: `(sum_pw - sum_rw) - (sum_pl - sum_rl)`",
    Margin.ln_dpo: "length-normalised (FPO's): `(avg_pw - avg_rw) - (avg_pl - avg_rl)`",
    Margin.simpo: "SimPO's, no reference: `avg_pw - avg_pl`",
}
# A hub repository id: "owner/name" (datasets' and transformers' rule for a name that is not
# a local path: no extension of a local file, not absolute, not starting with ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".txt")


@dataclass(frozen=True)
class TrainingValues:
    """How the weights were trained. ``steps``: optimizer steps taken; ``global_batch_size``:
    pairs per optimizer step over all devices; ``reference``: ``online`` or ``cached``;
    ``sae``/``hook``: the feature term's SAE and hook (``None`` without that term)."""

    optimizer: str
    learning_rate: float | None
    weight_decay: float | None
    scheduler: str | None
    warmup_steps: int | None
    global_batch_size: int
    epochs: int
    steps: int
    precision: str
    seed: int
    reference: str
    sae: str | None = None
    hook: str | None = None


@dataclass(frozen=True)
class DataValues:
    """Where the training pairs came from and how many there were (after bad rows)."""

    train_source: str
    train_split: str
    train_pairs: int
    val_source: str | None = None
    val_split: str | None = None
    val_pairs: int | None = None
    subset: str | None = None
    format: str = "auto"
    max_length: int | None = None
    max_prompt_length: int | None = None


@dataclass(frozen=True)
class CardValues:
    """Everything a card says except the evaluation (read from the run folder)."""

    objective: Objective
    model: str
    training: TrainingValues
    data: DataValues
    base_model: str | None = None
    command: str | None = None
    validation: dict[str, float] = field(default_factory=dict)


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a hub repository id ("owner/name") and is no local path."""
    if not name or not _HUB_ID.match(name) or name.lower().endswith(_LOCAL_EXTENSIONS):
        return None
    return None if os.path.exists(os.path.expanduser(name)) else name


def describe_source(source: str, split: str | None, subset: str | None) -> str:
    """A hub dataset with its subset and split, or a local file/folder by its name only."""
    if hub_id(source):
        where = f", subset `{subset}`" if subset else ""
        return f"hub dataset `{source}`{where}, split `{split}`"
    return f"local `{Path(source).name}`"


def front_matter(values: CardValues) -> str:
    """The YAML header the hub reads: library, tags, base model and datasets."""
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["fpo-template", values.objective.name, "preference-optimization"],
    }
    if values.base_model:
        meta["base_model"] = values.base_model
    data = values.data
    datasets = [s for s in (data.train_source, data.val_source) if hub_id(s)]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def objective_section(objective: Objective) -> str:
    """Name, margin, beta, gamma and every active constraint term with its settings."""
    rows: list[tuple[str, Any]] = [
        ("margin", f"`{objective.margin.value}`: {_MARGINS[objective.margin]}"),
        ("beta", objective.beta),
    ]
    if objective.margin is Margin.simpo:
        rows.append(("gamma_beta_ratio", objective.gamma_beta_ratio))
    kl, features = objective.constraints.token_kl, objective.constraints.features
    if kl.alpha:
        rows.append(
            ("token KL term (TDPO)", f"alpha {kl.alpha}, stop-gradient {_yes(kl.stop_gradient)}")
        )
    if features.alpha:
        detail = f"alpha {features.alpha}, k {features.k}, stop-gradient "
        detail += _yes(features.stop_gradient)
        if features.normalize:
            detail += ", normalised by the reference's feature energy"
        rows.append(("SAE feature term (FPO)", detail))
    if not objective.constraints.active():
        rows.append(("constraint terms", "none"))
    return (
        f"## Objective: `{objective.name}`\n\n"
        "Loss per pair: `-logsig(beta * [margin - constraints] - gamma)` "
        "(w = chosen, l = rejected, p = policy, r = reference).\n\n"
        + _table(rows, ("part", "setting"))
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _or(value: Any, default: str) -> Any:
    return default if value is None else value


def training_section(training: TrainingValues, model: str, base_model: str | None) -> str:
    """The hyperparameters that matter to reproduce or judge the run."""
    schedule = training.scheduler or "none (constant)"
    if training.scheduler and training.warmup_steps is not None:
        schedule += f", {training.warmup_steps} warm-up steps"
    reference = {
        "online": "online: a frozen copy of the initial weights",
        "cached": "cached: the initial weights' statistics precomputed by `fpo-cache`",
    }.get(training.reference, training.reference)
    rows: list[tuple[str, Any]] = [
        ("model", f"`{model}`" + (f" (`{base_model}`)" if base_model else "")),
        ("optimizer", training.optimizer),
        ("learning rate", _or(training.learning_rate, "the optimizer's default")),
    ]
    if training.weight_decay is not None:
        rows.append(("weight decay", training.weight_decay))
    rows += [
        ("scheduler", schedule),
        ("global batch size", f"{training.global_batch_size} pairs per optimizer step"),
        ("epochs", training.epochs),
        ("optimizer steps", training.steps),
        ("precision", training.precision),
        ("seed", training.seed),
        ("reference", reference),
    ]
    if training.sae:
        rows.append(("SAE (feature term)", f"`{training.sae}` at `{training.hook}`"))
    return "## Training\n\n" + _table(rows, ("hyperparameter", "value"))


def data_section(data: DataValues, validation: dict[str, float]) -> str:
    """Train and validation sources with their pair counts; final validation metrics."""
    lines = [
        "## Data\n",
        f"- train: {describe_source(data.train_source, data.train_split, data.subset)}, "
        f"{data.train_pairs} pairs",
    ]
    if data.val_source:
        lines.append(
            f"- validation: {describe_source(data.val_source, data.val_split, data.subset)}, "
            f"{data.val_pairs} pairs"
        )
    lines.append(f"- row format `{data.format}`")
    if data.max_length is not None:
        lines.append(
            f"- at most {data.max_length} tokens per prompt + response "
            f"(prompt at most {data.max_prompt_length})"
        )
    text = "\n".join(lines)
    if validation:
        rows = [(f"`{key}`", f"{value:.4g}") for key, value in sorted(validation.items())]
        text += "\n\nFinal validation metrics:\n\n" + _table(rows, ("metric", "value"))
    return text


def _pm(block: dict[str, Any], key: str) -> str:
    """``mean ± stderr`` of ``key`` in ``block`` (``-`` when absent)."""
    value = block.get(key)
    if value is None:
        return "-"
    stderr = block.get(f"{key.removesuffix('_mean')}_stderr")
    return f"{value:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def evaluation_section(summary: dict[str, Any] | None) -> str:
    """Judge means, win rates and KL (and the held-out pair metrics) of ``summary.json``,
    mean ± standard error over prompts or pairs; "not evaluated" without a summary."""
    if summary is None:
        return f"## Evaluation\n\n{NOT_EVALUATED}"
    settings = summary.get("settings") or {}
    lines = [
        "## Evaluation\n",
        f"Held-out test prompts: {summary.get('num_prompts')} prompts x "
        f"{summary.get('num_samples')} samples, temperature {settings.get('temperature')}, "
        f"at most {settings.get('max_new_tokens')} new tokens, seed {summary.get('seed')}; "
        "policy against the reference (the initial weights). Mean ± standard error.\n",
    ]
    rows = [
        f"| {name} | {_pm(block, 'policy_judge_mean')} | {_pm(block, 'reference_judge_mean')} "
        f"| {_pm(block, 'win_rate')} |"
        for name, block in (summary.get("judges") or {"judge": summary}).items()
    ]
    lines += ["| judge | policy mean | reference mean | win rate |", "|---|---|---|---|", *rows]
    lines.append(f"\nKL(policy ‖ reference): {_pm(summary, 'kl')} nats per completion (sampled).")
    pairs = [
        (label, key)
        for label, key in (
            ("preference accuracy", "preference_accuracy"),
            ("entropy", "entropy"),
            ("SAE feature drift", "feature_drift"),
        )
        if summary.get(key) is not None
    ]
    if pairs:
        shown = ", ".join(f"{label} {_pm(summary, key)}" for label, key in pairs)
        lines.append(f"\nHeld-out pairs ({summary.get('heldout_pairs')}): {shown}.")
    return "\n".join(lines)


def command_section(command: str | None) -> str:
    if not command:
        return "## Command\n\nNot recorded (the run was not started from the command line)."
    return (
        "## Command\n\nThe command that produced this run (its overrides as Hydra saved "
        f"them in `.hydra/overrides.yaml`):\n\n```bash\n{command}\n```"
    )


def render_card(values: CardValues, summary: dict[str, Any] | None = None) -> str:
    """The whole card as text (``summary``: the run's ``evaluation/summary.json``)."""
    objective = values.objective
    intro = (
        f"# {objective.name} policy trained with fpo-template\n\n"
        f"`{values.model}` fine-tuned by preference optimisation with the `{objective.name}` "
        "objective (fpo-template: FPO, DPO, SimPO, TDPO). Load it with\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo id>")\n'
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")\n```'
    )
    sections = [
        intro,
        objective_section(objective),
        training_section(values.training, values.model, values.base_model),
        data_section(values.data, values.validation),
        f"{EVALUATION_START}\n{evaluation_section(summary)}\n{EVALUATION_END}",
        command_section(values.command),
    ]
    return front_matter(values) + "\n" + "\n\n".join(sections) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_save_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_model_card(folder: str | os.PathLike, values: CardValues) -> Path:
    """Write ``<folder>/README.md``, not evaluated yet (:func:`refresh_card_evaluation`)."""
    path = Path(folder) / CARD_FILE
    _write_text(path, render_card(values))
    return path


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<run>/evaluation/summary.json``, ``None`` when the run has none."""
    path = Path(run_dir) / EVALUATION_DIR / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def refresh_card_evaluation(policy_folder: str | os.PathLike) -> bool:
    """Replace the evaluation block of ``<policy_folder>/README.md`` by the run's summary
    (the run folder is the policy folder's parent: ``<run>/policy/``,
    ``<run>/evaluation/summary.json``). False, nothing written, without a card that has
    the block or without a summary."""
    card = Path(policy_folder) / CARD_FILE
    summary = read_summary(Path(policy_folder).parent)
    if summary is None or not card.is_file():
        return False
    text = card.read_text(encoding="utf-8")
    start, end = text.find(EVALUATION_START), text.find(EVALUATION_END)
    if start < 0 or end < start:
        return False
    block = f"{EVALUATION_START}\n{evaluation_section(summary)}\n"
    updated = text[:start] + block + text[end:]
    if updated != text:
        _write_text(card, updated)
    return True
