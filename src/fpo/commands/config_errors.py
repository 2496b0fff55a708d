"""A config Hydra cannot compose, as one paragraph with a "did you mean".

Hydra reports a misspelt group option with the group's options, and a misspelt key with
"To append to your config use +key=value", advice that adds the misspelt key and fails
later with a traceback. :func:`explain` turns these errors into a message that names the
override, suggests the closest real names (`difflib`, against the group's options or the
keys of the config node where the path broke, group names at the top) and never
suggests ``+``. Each suggestion is built from real names only: an option the config
repository lists, or a key path that exists level by level in the composed config.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

log = logging.getLogger("fpo")

#: How many close names to suggest, and how close (difflib's ratio) they must be.
MAX_SUGGESTIONS = 3
CUTOFF = 0.6


def closest(word: str, names: Sequence[str]) -> list[str]:
    """Up to `MAX_SUGGESTIONS` of ``names`` closest to ``word``, best first."""
    return difflib.get_close_matches(word, sorted(set(names)), MAX_SUGGESTIONS, CUTOFF)


def command_line_overrides(argv: Sequence[str]) -> list[Override]:
    """The ``key=value`` overrides among ``argv`` (flags and unparsable ones left out)."""
    parser = OverridesParser.create()
    overrides = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            overrides.extend(parser.parse_overrides([arg]))
        except Exception:  # Hydra reports a syntax error itself
            continue
    return overrides


def typed_value(override: Override) -> str:
    """The value as the user typed it (a sweep too: ``dpo,simpo``)."""
    return str(override.input_line).split("=", 1)[1]


def values_of(override: Override) -> list[str]:
    """The value(s) of an override as the user typed them (each value of a sweep)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [typed_value(override)]


def group_options(group: str) -> list[str]:
    """Every option of ``group`` and of its subgroups, as ``group=`` values
    (``smoke``, ``ablation/k``)."""
    loader = GlobalHydra.instance().config_loader()
    options = list(loader.get_group_options(group))
    for sub in loader.list_groups(group):
        options += [f"{sub}/{option}" for option in group_options(f"{group}/{sub}")]
    return options


def top_groups() -> list[str]:
    """The config groups a ``group=option`` override can name at the top (not Hydra's)."""
    groups = GlobalHydra.instance().config_loader().list_groups("")
    return [g for g in groups if g != "hydra" and group_options(g)]


def with_values(override: Override, old: str, new: str) -> str:
    """The override as typed, with the value ``old`` replaced by ``new``."""
    values = [new if value == old else value for value in values_of(override)]
    return f"{override.get_key_element()}={','.join(values)}"


def option_message(missing: str, overrides: list[Override]) -> str | None:
    """``group=option`` naming no config (``missing`` is Hydra's ``group/option`` path)."""
    for override in overrides:
        group = override.key_or_group
        for value in values_of(override):
            if f"{group}/{value}" != missing:
                continue
            options = group_options(group)
            message = (
                f"{override.input_line}: {value!r} is not an option of the config group {group}."
            )
            matches = closest(value, options)
            if matches:
                fixes = " or ".join(with_values(override, value, m) for m in matches)
                message += f" Did you mean {fixes}?"
            return message + f" Its options: {', '.join(sorted(options))}."
    return None


def fix_path(node: DictConfig, parts: list[str]) -> list[list[str]]:
    """Real key paths below ``node`` close to ``parts``: the closest names at the first level
    that is not a key, each continued with the best match at every level below it."""
    if not parts:
        return [[]]
    keys = [str(k) for k in node]
    first, rest = parts[0], parts[1:]
    paths = []
    for name in [first] if first in keys else closest(first, keys):
        child = node._get_node(name)  # a value node or a config, uninterpolated
        if not rest:
            paths.append([name])
        elif isinstance(child, DictConfig) and not child._is_none():
            below = fix_path(child, rest)
            paths += [[name, *below[0]]] if below else []
    return paths


def key_message(
    error: ConfigKeyError | ConfigAttributeError, overrides: list[Override]
) -> str | None:
    """``a.b.c=value`` where some level of the path is not a key of the config."""
    broken = str(error.full_key)
    parent = error.parent_node
    if not isinstance(parent, DictConfig):
        return None
    for override in overrides:
        key = override.key_or_group
        if key != broken and not key.startswith(broken + "."):
            continue
        prefix = broken.rpartition(".")[0]
        parts = key[len(prefix) + 1 if prefix else 0 :].split(".")
        value = typed_value(override)
        where = prefix or "the top level"
        message = f"{key}={value}: the config has no key {broken}."
        groups = top_groups() if not prefix else []
        if not prefix and parts[0] in groups:  # a group with no option chosen
            options = ", ".join(sorted(group_options(parts[0])))
            return (
                f"{key}={value}: {parts[0]} is a config group and none of its options is "
                f"chosen; choose one first, e.g. {parts[0]}=<option> {key}={value} "
                f"(options: {options})."
            )
        fixes = [".".join(p) for p in fix_path(parent, parts)]
        if len(parts) == 1:  # a misspelt group name, e.g. objectve=dpo
            fixes += [g for g in closest(parts[0], groups) if g not in fixes]
        fixes = [f"{prefix}.{fix}" if prefix else fix for fix in fixes][:MAX_SUGGESTIONS]
        fixed = [group_fix(fix, override) if fix in groups else f"{fix}={value}" for fix in fixes]
        suggestions = [fix for fix in fixed if fix is not None]
        if suggestions:
            message += f" Did you mean {' or '.join(suggestions)}?"
        keys = ", ".join(sorted(str(k) for k in parent if k != "hydra"))
        message += f" Keys at {where}: {keys}."
        if groups:
            message += f" Config groups: {', '.join(sorted(groups))}."
        return message
    return None


def group_fix(group: str, override: Override) -> str | None:
    """A misspelt group name corrected, and a misspelt option of it too; ``None`` when an
    option has no close match (the suggestion would not compose)."""
    options = group_options(group)
    values = []
    for value in values_of(override):
        matches = [value] if value in options else closest(value, options)
        if not matches:
            return None
        values.append(matches[0])
    return f"{group}={','.join(values)}"


def explain(error: BaseException, argv: Sequence[str], config_dir: str) -> str | None:
    """A did-you-mean message for a composition ``error`` caused by one of the command-line
    overrides in ``argv``; ``None`` when the error is of another kind. The names come from
    the configs in ``config_dir``."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return _explain(error, command_line_overrides(argv))
    except Exception:  # never a traceback for a typo: Hydra's own message instead
        log.debug("no did-you-mean for %r", error, exc_info=True)
        return None


def _explain(error: BaseException, overrides: list[Override]) -> str | None:
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        return option_message(error.missing_cfg_file, overrides)
    cause = error.__cause__
    if isinstance(error, ConfigCompositionException) and isinstance(
        cause, ConfigKeyError | ConfigAttributeError
    ):
        return key_message(cause, overrides)
    return None
