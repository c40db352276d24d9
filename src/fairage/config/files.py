"""Config files: bounded YAML reading, ``--set`` overrides, ``load_config``, ``dump_config``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import ExperimentConfig, clip, validate_config

#: a config's YAML may hold at most this many values once its aliases are expanded
MAX_YAML_VALUES = 100_000
#: ... and at most this many aliases (``*name``)
MAX_YAML_ALIASES = 1_000
#: ... in at most this many characters
MAX_YAML_CHARS = 5_000_000


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` with bounds: ConfigError naming ``source`` for an alias bomb or huge text.

    Anchors and aliases are allowed (``stage2: *stage1``), but the document is measured on
    its composed graph, where an alias costs nothing, before it is built: at most
    ``MAX_YAML_ALIASES`` aliases and ``MAX_YAML_VALUES`` values once expanded (a "billion
    laughs" of 6 levels expands to millions), and no alias inside itself.
    ``yaml.YAMLError`` for invalid YAML, as ``yaml.safe_load``.
    """
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{source}: {len(text)} characters of YAML; a config holds at most {MAX_YAML_CHARS}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML nests too deeply") from None
    finally:
        loader.dispose()


def _check_yaml_size(root, source: str) -> None:
    """ConfigError when the YAML graph of ``root`` expands beyond the bounds of ``load_yaml``."""
    sizes: dict[int, int] = {}  # expanded size of every node, each counted once however often it is aliased
    aliases = 0
    seen: set[int] = set()
    # iterative post-order walk: a node is sized once its children are
    stack: list[tuple[Any, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            children = _yaml_children(node)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values (aliases of "
                    "aliases: a YAML bomb?); a config is a few hundred"
                )
            continue
        if key in seen:  # an alias: costs its target's size, counted again
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{source}: more than {MAX_YAML_ALIASES} YAML aliases; a config needs a few")
            if key in on_path:
                raise ConfigError(f"{source}: a YAML alias refers to the value that holds it (a recursive alias)")
            continue
        seen.add(key)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _yaml_children(node))


def _yaml_children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# --------------------------------------------------------------------------- errors


def _parse_value(text: str) -> Any:
    try:
        value = load_yaml(text, f"override value {clip(text, 60)!r}")
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict.

    ``stage2.lr=5e-5``, ``model.head=[{units: 64}]``, ``stage1=null``. Missing
    intermediate mappings are created; validation afterwards rejects unknown keys.
    """
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{clip(item)}' must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = _parse_value(value)
    return raw


# --------------------------------------------------------------------------- files and presets


def read_yaml(path: str | Path) -> dict:
    """The mapping in the YAML file ``path`` (empty file: ``{}``); ConfigError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings (model:, data:, stage1:, ...), "
            f"not a {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a YAML config file."""
    return validate_config(apply_overrides(read_yaml(path), overrides), str(path))


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (round-trips through validate_config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
