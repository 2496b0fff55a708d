"""One builder: each part of a run is constructed at exactly one call site, in
``fpo/builder.py``, and no function below the entry points takes the Hydra config.

Read from the source (AST), so a second construction path fails here by name, wherever it
is added: ``src/`` (one call site each), ``benchmarks/`` and ``tests/`` (no module or online
reference assembled by hand: they use ``fpo.builder.assemble_module`` / ``online_reference``).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "fpo"
BUILDER = SRC / "builder.py"
#: Where the composed Hydra config may be read: the entry points and the builder.
#: The entry points, the builder, and the check the builder runs first on the raw config
#: (every numeric setting, before anything loads).
CONFIG_READERS = (SRC / "commands", BUILDER, SRC / "settings_check.py")
#: Hydra calls these with its own config (the callback interface), not ours.
HYDRA_CALLBACKS = {
    ("sweep.py", "on_multirun_start"),
    ("sweep.py", "on_multirun_end"),
    ("folders.py", "on_run_start"),
    ("folders.py", "run_dir_key"),  # reads hydra.run.dir / hydra.sweep.dir of that config
}


def calls(paths: list[Path]) -> Iterator[tuple[Path, ast.Call]]:
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield path, node


def name_of(call: ast.Call) -> str:
    """The called name's last part: ``copy.deepcopy(x)`` -> ``deepcopy``."""
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def first_argument(call: ast.Call) -> str:
    return ast.unparse(call.args[0]) if call.args else ""


def instantiates(word: str) -> Callable[[ast.Call], bool]:
    """Hydra ``instantiate`` of a config whose expression contains ``word``."""
    return lambda call: name_of(call) == "instantiate" and word in first_argument(call)


#: part -> what constructs it
PARTS: dict[str, Callable[[ast.Call], bool]] = {
    "the reference model (a copy of the policy)": lambda call: name_of(call) == "deepcopy",
    "the online reference": lambda call: name_of(call) == "OnlineReference",
    "the LoRA policy's own reference": lambda call: name_of(call) == "AdapterFreeReference",
    "the LoRA adapters (model.lora)": lambda call: name_of(call) == "add_adapters",
    "the Lightning module": lambda call: name_of(call) == "FPOLightningModule",
    "the objective": lambda call: name_of(call) == "build_objective",
    "the objective's validation": lambda call: (
        name_of(call) == "validate" and any(k.arg == "cached_reference" for k in call.keywords)
    ),
    "the packing settings": lambda call: name_of(call) == "Packing",
    "the model (cfg.model.loader)": lambda call: (
        instantiates("loader")(call) and "sae" not in first_argument(call)
    ),
    "the SAE (cfg.sae)": instantiates("sae"),
    "the data module (cfg.data)": instantiates("data"),
    "the optimizer (cfg.optimizer)": instantiates("optimizer"),
}


def src_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def construction_sites(paths: list[Path], is_part: Callable[[ast.Call], bool]) -> list[str]:
    sites = []
    for path, call in calls(paths):
        # Objective.validate delegating to its own terms is the same validation.
        inside_objective = path.name == "objective.py" and name_of(call) == "validate"
        if is_part(call) and not inside_objective:
            shown = path.relative_to(ROOT) if ROOT in path.parents else path
            sites.append(f"{shown}:{call.lineno}")
    return sites


@pytest.mark.parametrize("part", list(PARTS))
def test_each_part_is_constructed_at_one_call_site_in_the_builder(part):
    sites = construction_sites(src_files(), PARTS[part])
    builder = str(BUILDER.relative_to(ROOT))
    assert len(sites) == 1 and sites[0].startswith(builder + ":"), (
        f"{part}: constructed at {sites or 'no call site'}; expected one call site in {builder}"
    )


def test_benchmarks_and_tests_assemble_modules_and_references_through_the_builder():
    outside = sorted((ROOT / "benchmarks").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    outside.remove(Path(__file__).resolve())  # below: the module's own refusal, by hand
    for part in ("the online reference", "the Lightning module"):
        sites = construction_sites(outside, PARTS[part])
        assert not sites, f"{part} built by hand at {sites}: use fpo.builder"


def config_parameters(path: Path) -> Iterator[tuple[str, str]]:
    """``(function, parameter)`` of each parameter named like a config (``cfg``, ``*_cfg``)
    or annotated ``DictConfig``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            if arg.arg == "cfg" or arg.arg.endswith("_cfg") or "DictConfig" in annotation:
                yield node.name, arg.arg


def test_no_function_below_the_entry_points_takes_the_hydra_config():
    found = []
    for path in src_files():
        if any(path == reader or reader in path.parents for reader in CONFIG_READERS):
            continue
        for function, parameter in config_parameters(path):
            if (path.name, function) not in HYDRA_CALLBACKS:
                found.append(f"{path.relative_to(ROOT)}: {function}({parameter})")
    assert not found, f"typed settings instead of the Hydra config: {found}"


def test_nothing_below_the_entry_points_imports_one():
    """The route from a command to the loss never comes back to the command: no library
    module imports an entry point (``fpo.commands.<name>``; ``common`` is shared helpers,
    ``__main__`` shims are entry points themselves)."""
    found = []
    for path in src_files():
        if SRC / "commands" in path.parents or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("fpo.commands.") and name != "fpo.commands.common":
                    found.append(f"{path.relative_to(ROOT)}: {name}")
    assert not found, found


def test_the_scans_see_what_they_look_for(tmp_path):
    """The scans find a second construction and a config parameter where they are added."""
    extra = tmp_path / "extra.py"
    extra.write_text(
        "import copy\n"
        "def reference_of(policy, cfg):\n"
        "    return OnlineReference(copy.deepcopy(policy)), instantiate(cfg.model.loader)\n"
    )
    parts = ("the reference model (a copy of the policy)", "the online reference")
    for part in (*parts, "the model (cfg.model.loader)"):
        assert len(construction_sites([extra], PARTS[part])) == 1, part
    assert list(config_parameters(extra)) == [("reference_of", "cfg")]


def test_the_module_takes_a_built_objective_not_its_config():
    from functools import partial

    import torch

    from fpo.models.tiny import build_tiny_model
    from fpo.module import FPOLightningModule

    optimizer = partial(torch.optim.SGD, lr=0.0)
    with pytest.raises(TypeError, match="Objective, not dict"):
        FPOLightningModule(build_tiny_model(), objective={"margin": "simpo"}, optimizer=optimizer)
