"""A backport of a Hydra fix newer than the pinned hydra-core 1.3.8 (imported by every
command, through `fpo.commands.common`).

Hydra composes a config, and ``--help`` lists every config group's options, through a
``CachingConfigRepository`` that deep-copies the config sources each time; in 1.3.8 the
structured-config source holds the whole ``ConfigStore``, so each copy copied every stored
node (Hydra's own, the installed plugins', the objective schema): most of ``fpo-train
--help``'s 3 seconds. Upstream Hydra (pull request 2928) makes the source fetch
``ConfigStore.instance()`` instead of holding a copy; here a copy of the source shares the
one store, the same behaviour (the store's ``load`` returns a copy of a node, so no copy is
mutated). Measured in docs/benchmarks.md, "Start-up time".
"""

from __future__ import annotations

import copy
from typing import Any

from hydra._internal.sources_registry import SourcesRegistry
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins


def copy_sharing_store(source: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(source)``: a shallow copy whose ``store`` is the live singleton."""
    clone = copy.copy(source)
    clone.store = ConfigStore.instance()
    return clone


# Hydra's plugin scan (done once per process, here rather than at the first composition)
# loads its own copy of the config-source classes; patch the one it resolves.
Plugins.instance()
SOURCE = SourcesRegistry.instance().resolve("structured")
# Only where the source holds the store (hydra-core 1.3.x); a Hydra with the fix has no
# ``store`` annotation and is left alone.
if "store" in getattr(SOURCE, "__annotations__", {}) and "__deepcopy__" not in vars(SOURCE):
    SOURCE.__deepcopy__ = copy_sharing_store
