"""The packages of the wheel; everything else is in pyproject.toml.

Besides ``src/fpo``, the wheel ships the files the configs name, in ``fpo/shipped/`` with the
repository's layout (`fpo.locations` finds them): ``configs/``, ``data/``, the fixture rows
of the smoke configs (``tests/fixtures/``) and the main job's SAE
(``assets/sae/gemma3-270m-layer17``; the other SAEs stay in a checkout). A list here, not in
pyproject.toml, because setuptools' package discovery cannot be combined with mapped folders.
"""

from setuptools import find_namespace_packages, find_packages, setup

#: Package name in the wheel -> (repository folder, files under it to ship).
SHIPPED = {
    "fpo.shipped.configs": ("configs", ["*.yaml", "**/*.yaml"]),
    "fpo.shipped.data": ("data", ["**/*.jsonl", "**/*.md"]),
    "fpo.shipped.tests.fixtures": ("tests/fixtures", ["*.jsonl"]),
    "fpo.shipped.assets": ("assets", ["sae/gemma3-270m-layer17/*"]),
}


def shipped_packages() -> list[str]:
    """The mapped packages and their subfolders that Python could import (the ones
    setuptools would otherwise warn about); their files are the top package's data."""
    return [
        f"{name}.{sub}" if sub else name
        for name, (folder, _) in SHIPPED.items()
        for sub in ["", *find_namespace_packages(folder)]
        if all(part.isidentifier() for part in sub.split(".") if sub)
    ]


setup(
    packages=[*find_packages("src"), *shipped_packages()],
    package_dir={"": "src", **{name: folder for name, (folder, _) in SHIPPED.items()}},
    package_data={"fpo": ["py.typed"], **{name: files for name, (_, files) in SHIPPED.items()}},
    # A developer's configs/local/*.yaml (git-ignored) stays out of the wheel.
    exclude_package_data={"fpo.shipped.configs": ["local/*"]},
)
