"""Sharing a run: the model card beside the saved policy of a real tiny-model run (with and
without evaluation), and ``fpo-push`` with ``huggingface_hub.HfApi`` replaced by a recorder
(no network: sockets refuse to connect)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from fpo.commands import push
from fpo.model_card import NOT_EVALUATED
from fpo.testing import run_module

POLICY_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
}  # fmt: skip


def _train(logs: Path, *overrides: str) -> Path:
    result = run_module("fpo.commands.train", f"paths.log_dir={logs}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (logs / "smoke" / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """``fpo-train experiment=smoke evaluation=smoke save_policy=true``."""
    logs = tmp_path_factory.mktemp("evaluated")
    return _train(logs, "experiment=smoke", "evaluation=smoke", "save_policy=true")


@pytest.fixture(scope="module")
def unevaluated(tmp_path_factory) -> Path:
    """``fpo-train experiment=smoke objective=tdpo2 save_policy=true`` (no evaluation)."""
    logs = tmp_path_factory.mktemp("unevaluated")
    return _train(logs, "experiment=smoke", "objective=tdpo2", "save_policy=true")


def test_policy_folder_holds_weights_tokenizer_and_a_hub_model_card(evaluated):
    policy = evaluated / "policy"
    assert {p.name for p in policy.iterdir()} == POLICY_FILES
    card = ModelCard.load(policy / "README.md")  # the hub's own parser
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["fpo-template", "fpo", "preference-optimization"]
    assert card.data.base_model is None and card.data.datasets is None  # tiny, local fixture
    AutoModelForCausalLM.from_pretrained(policy)  # the folder loads as it is


def test_card_states_objective_training_data_and_command(evaluated):
    card = (evaluated / "policy" / "README.md").read_text()
    overrides = yaml.safe_load((evaluated / ".hydra" / "overrides.yaml").read_text())
    for text in (
        "## Objective: `fpo`",
        "| SAE feature term (FPO) | alpha 0.5, k 50, stop-gradient yes |",
        "| learning rate | 0.001 |",  # experiment=smoke
        "| global batch size | 2 pairs per optimizer step |",
        "| epochs | 2 |",
        "| optimizer steps | 8 |",  # 8 pairs / batch 2 x 2 epochs
        "| precision | 32-true |",
        "| reference | online:",
        "`build_random_sae` at `blocks.1.hook_resid_post`",
        "train: local `ultrafeedback_binarized.jsonl`, 8 pairs",
        "`val/rewards/accuracies`",
        "fpo-train " + " ".join(overrides),
    ):
        assert text in card, text


def test_card_reports_the_runs_evaluation(evaluated):
    card = (evaluated / "policy" / "README.md").read_text()
    summary = json.loads((evaluated / "evaluation" / "summary.json").read_text())
    assert NOT_EVALUATED not in card
    kl = f"KL(policy ‖ reference): {summary['kl']:.4g} ± {summary['kl_stderr']:.2g} nats"
    assert kl in card
    for name, block in summary["judges"].items():
        win = f"{block['win_rate']:.4g} ± {block['win_rate_stderr']:.2g}"
        assert f"| {name} | " in card and f" | {win} |" in card
    assert f"Held-out pairs ({summary['heldout_pairs']}): preference accuracy" in card


def test_card_without_evaluation(unevaluated):
    card = (unevaluated / "policy" / "README.md").read_text()
    assert not (unevaluated / "evaluation").exists()
    assert f"## Evaluation\n\n{NOT_EVALUATED}" in card
    assert ModelCard.load(unevaluated / "policy" / "README.md").data.tags[1] == "tdpo2"
    assert "| token KL term (TDPO) | alpha 0.5, stop-gradient yes |" in card
    assert "SAE (feature term)" not in card  # no feature term, no SAE loaded


# --------------------------------------------------------------------------- fpo-push


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records the calls, answers like the hub."""

    calls: list[tuple[str, dict]]
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        self.calls.append(("HfApi", {"token": token, **kwargs}))

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, {"args": args, **kwargs}))
        if self.fail_with is not None:
            raise self.fail_with

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        readme = Path(kwargs["folder_path"]) / "README.md"
        self.calls.append(("uploaded card", {"text": readme.read_text()}))
        return SimpleNamespace(commit_url="https://huggingface.co/me/policy/commit/0")


@pytest.fixture
def hub(monkeypatch):
    """``HfApi`` replaced by a fresh recorder, a token in the environment, no sockets."""

    def no_network(*args, **kwargs):
        raise AssertionError("fpo-push touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    recorder = type("Recorder", (RecordingApi,), {"calls": []})
    monkeypatch.setattr(huggingface_hub, "HfApi", recorder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return recorder


def _push(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        push.main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_push_creates_the_repo_and_uploads_the_policy_folder(evaluated, hub, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    # a later fpo-eval rewrote the summary: the pushed card reports the new numbers
    summary_path = run / "evaluation" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "kl": 123.5}))
    code, out, _ = _push(
        capsys, str(run), "--repo-id", "me/policy", "--private", "--revision", "v1",
        "--commit-message", "first",
    )  # fmt: skip
    assert code == 0
    names = [name for name, _ in hub.calls]
    assert names == ["HfApi", "create_repo", "create_branch", "upload_folder", "uploaded card"]
    calls = dict(hub.calls)
    assert calls["HfApi"]["token"] == "hf_test_token"
    assert calls["create_repo"] == {
        "args": ("me/policy",), "repo_type": "model", "private": True, "exist_ok": True,
    }  # fmt: skip
    assert calls["create_branch"] == {
        "args": ("me/policy",), "branch": "v1", "repo_type": "model", "exist_ok": True,
    }  # fmt: skip
    assert calls["upload_folder"] == {
        "args": (), "repo_id": "me/policy", "folder_path": str(run / "policy"),
        "repo_type": "model", "revision": "v1", "commit_message": "first",
    }  # fmt: skip
    assert "KL(policy ‖ reference): 123.5 ±" in calls["uploaded card"]["text"]
    assert "uploaded: https://huggingface.co/me/policy/commit/0" in out


def test_push_without_revision_makes_no_branch(evaluated, hub, capsys):
    code, _, _ = _push(capsys, str(evaluated / "policy"), "--repo-id", "me/policy")
    assert code == 0
    calls = dict(hub.calls)
    assert "create_branch" not in calls and calls["upload_folder"]["revision"] is None
    assert calls["create_repo"]["private"] is False


def test_dry_run_lists_the_files_and_calls_nothing(evaluated, hub, capsys):
    code, out, _ = _push(capsys, str(evaluated), "--repo-id", "me/policy", "--dry-run")
    assert code == 0 and hub.calls == []
    assert "model repository me/policy (public, branch main)" in out
    for name in POLICY_FILES:
        assert f"  {name}  (" in out, name
    assert "nothing uploaded" in out


def test_push_refuses_a_folder_without_a_policy(unevaluated, hub, capsys):
    code, _, err = _push(capsys, str(unevaluated / "evaluation"), "--repo-id", "me/p")
    assert code == 2 and "no saved policy" in err and "save_policy=true" in err
    assert hub.calls == []


def test_push_refuses_without_a_token(evaluated, hub, capsys, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    code, _, err = _push(capsys, str(evaluated), "--repo-id", "me/policy")
    assert code == 2 and hub.calls == []
    assert "HF_TOKEN" in err and "hf auth login" in err and "huggingface-cli login" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0  # one paragraph


def test_push_maps_a_refused_token_to_one_paragraph(evaluated, hub, capsys):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    response = httpx.Response(401, request=request)
    hub.fail_with = HfHubHTTPError("401 Unauthorized", response=response)
    code, _, err = _push(capsys, str(evaluated), "--repo-id", "me/policy")
    assert code == 2 and "HTTP 401" in err and "HF_TOKEN" in err


def test_push_refuses_a_bad_repo_id(evaluated, hub, capsys):
    for bad in ("policy", "me//policy", "me/pol icy"):
        code, _, err = _push(capsys, str(evaluated), "--repo-id", bad, "--dry-run")
        assert code == 2 and "is not a hub repository id" in err, bad
