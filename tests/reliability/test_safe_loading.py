"""Safe loading: no pickled code, no remote code unless asked, damaged files refused clearly."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from fpo.errors import UserError
from fpo.models.hf import load_hf_causal_lm
from fpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from fpo.sae import build_random_sae, load_sae

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def name(func: ast.expr) -> str:
    return ast.unparse(func)


def keyword(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_every_torch_load_is_weights_only_and_no_remote_code_by_default():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name(node.func) in ("torch.load", "load") and "torch" in name(node.func):
                value = keyword(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{where}: torch.load without weights_only=True")
            if name(node.func).endswith(("pickle.load", "pickle.loads", "np.load")):
                offenders.append(f"{where}: {name(node.func)}")
            value = keyword(node, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                offenders.append(f"{where}: trust_remote_code=True")
        for node in ast.walk(tree):  # defaults of parameters named trust_remote_code
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults))
                defaults += node.args.defaults + node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code" and not (
                        isinstance(default, ast.Constant) and default.value is False
                    ):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: default")
    assert not offenders, offenders
    config_hits = [
        str(p)
        for p in (ROOT / "configs").rglob("*.yaml")
        if "trust_remote_code: true" in p.read_text()
    ]
    assert not config_hits
    assert inspect.signature(load_hf_causal_lm).parameters["trust_remote_code"].default is False


def test_missing_truncated_or_pickled_model_folders_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_hf_causal_lm(str(tmp_path / "nowhere"))
    folder = tmp_path / "model"
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    load_hf_causal_lm(str(folder))  # intact: loads
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a new file: the loaded model still maps the old one
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="could not load the model folder"):
        load_hf_causal_lm(str(folder))
    weights.unlink()
    # pickled weights only
    torch.save(build_tiny_model().state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        load_hf_causal_lm(str(folder))


def test_truncated_sae_file_is_refused(tmp_path):
    build_random_sae(16, 32).save_model(tmp_path / "sae")
    load_sae(path=str(tmp_path / "sae"))
    weights = next((tmp_path / "sae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="could not load the SAE"):
        load_sae(path=str(tmp_path / "sae"))
