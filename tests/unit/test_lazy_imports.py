"""Imports only what is used: a run without an SAE never imports sae-lens (and
TransformerLens: ~100 MB of RSS), and ``--help`` or a config error imports no model library
(start-up time, docs/benchmarks.md)."""

from __future__ import annotations

import copy

import pytest
from hydra._internal.sources_registry import SourcesRegistry
from hydra.core.config_store import ConfigStore

import fpo.hydra_compat  # noqa: F401  (what every command imports)
from fpo.testing import run_python

#: What a command needs only once it builds a run.
MODEL_LIBRARIES = ("torch", "lightning", "transformers", "sae_lens", "wandb")
HELP = """
import atexit, sys
atexit.register(lambda: print("LOADED", sorted(m for m in {libraries} if m in sys.modules)))
sys.argv = ["{command}", *{args}]
from {module} import main
main()
"""

SCRIPT = """
import sys
import fpo.commands.train, fpo.builder, fpo.module, fpo.forward, fpo.reference.base
from fpo.testing import compose_train
from fpo.builder import build_run_parts

cfg = compose_train("experiment=smoke", "objective=dpo", "paths.output_dir=" + sys.argv[1])
build_run_parts(cfg).build_module()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sae_lens", "transformer_lens"))
print("LOADED", loaded[:3])
import fpo.sae
fpo.sae.build_random_sae(d_in=4, d_sae=8)  # the SAE path still imports it when used
print("AFTER_SAE", "sae_lens" in sys.modules)
"""


def test_dpo_run_does_not_import_sae_lens(tmp_path):
    done = run_python("-c", SCRIPT, str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout
    assert "AFTER_SAE True" in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("fpo.commands.train", ["--help"]),
        ("fpo.commands.eval", ["--help"]),
        ("fpo.commands.train", ["experiment=no_such_preset"]),
        ("fpo.commands.judge_check", ["--help"]),
        ("fpo.commands.push", ["--help"]),
        ("fpo.sae_maker.cli", ["--help"]),
        ("fpo.sae_maker.cli", ["--architecture", "no_such_kind", "--out", "x"]),
    ],
)
def test_help_and_config_errors_import_no_model_library(module, args):
    command = "fpo-" + module.rsplit(".", 1)[-1]
    script = HELP.format(libraries=MODEL_LIBRARIES, command=command, module=module, args=args)
    done = run_python("-c", script, timeout=120)
    assert done.returncode in (0, 2), done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-2000:]


def test_hydra_copies_of_the_config_sources_share_the_config_store():
    """`fpo.hydra_compat`: Hydra copies its sources per composition and per config group of
    ``--help``; a copy of the structured-config source shares the live store."""
    source = SourcesRegistry.instance().resolve("structured")("schema", "structured://")
    assert copy.deepcopy(source).store is ConfigStore.instance()
