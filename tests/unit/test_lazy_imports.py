"""A run without an SAE never imports sae-lens (and TransformerLens: ~100 MB of RSS)."""

from __future__ import annotations

from fpo.testing import run_python

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
