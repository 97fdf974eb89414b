"""Compose and validate the run configuration (the only module that knows the config's shape).

The command line is VISSL's: ``config=pretrain/swav/swav_8node_resnet`` picks a seed config,
``+config/pretrain/swav/transforms=multicrop_2x224_4x96`` adds a group file on top, and
``config.LOSS.swav_loss.temperature=0.2`` sets one key. Files are composed by Hydra; every key is
then checked against configs/defaults.yaml, so a typo is an error that names the closest real key.
"""
from __future__ import annotations

import difflib
import math
import re
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from .metrics import notice

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# VISSL's older key path for trunk parameters (used on the NPID page) and where it lives now.
KEY_ALIASES = {"MODEL.TRUNK.TRUNK_PARAMS.": "MODEL.TRUNK."}


MAX_SHOWN = 80       # characters of a value echoed in an error (a 1 MB value is not printed whole)
MAX_NESTING = 32     # levels of lists and mappings in one command-line value


class ConfigError(ValueError):
    """A one-line, user-facing configuration error (the CLI prints it and exits with status 2)."""


def shown(value) -> str:
    """repr(value), cut to MAX_SHOWN characters with the full length said."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


def _nesting(value) -> int:
    """Levels of lists and mappings in a parsed value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple, dict)):
            deepest = max(deepest, depth + 1)
            if deepest > MAX_NESTING:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def join_words(argv: list[str]) -> list[str]:
    """One word per override: a value with spaces that the shell split into several words (an unquoted
    ``config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [...]}]]``) is joined back, since a word that
    does not start a new override continues the previous one."""
    words: list[str] = []
    for word in argv:
        if re.match(r"^\+?config[./=]", word) or not words:
            words.append(word)
        else:
            words[-1] += " " + word
    return words


def split_arguments(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split command-line words into Hydra group overrides and ``config.KEY=value`` assignments."""
    groups, assignments = [], []
    for word in join_words(argv):
        if "=" not in word:
            raise ConfigError(f"cannot read argument {shown(word)}: expected config=..., +config/...=... or "
                              "config.KEY=value")
        key, value = word.split("=", 1)
        if key in ("config", "+config"):
            groups.append(f"+config={value}")
        elif key.startswith("+config/") or key.startswith("config/"):
            groups.append(f"+{key.lstrip('+')}={value}")
        elif key.startswith("config."):
            assignments.append((key[len("config."):], value))
        else:
            raise ConfigError(f"cannot read argument {shown(word)}: keys start with config.")
    return groups, assignments


def parse_value(text: str):
    """A command-line value as YAML (lists, dicts, True/False, numbers, null), 1e-08 included."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse value {shown(text)}: {str(error).splitlines()[0]}") from None
    except RecursionError:  # deeper than the parser's stack
        raise ConfigError(f"value {shown(text)} is nested more than {MAX_NESTING} levels deep") from None
    if _nesting(value) > MAX_NESTING:
        raise ConfigError(f"value {shown(text)} is nested more than {MAX_NESTING} levels deep")
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for key, child in node.items():
            path = f"{prefix}{key}"
            keys.append(path)
            keys.extend(_dotted_keys(child, path + "."))
    return keys


def _closest(path: str, defaults: dict) -> str:
    candidates = _dotted_keys(defaults)
    leaf = path.rsplit(".", 1)[-1]
    siblings = [c for c in candidates if c.rsplit(".", 1)[0] == path.rsplit(".", 1)[0] and "." in path]
    match = difflib.get_close_matches(leaf, [s.rsplit(".", 1)[-1] for s in siblings], n=1, cutoff=0.5)
    if match:
        return f"{path.rsplit('.', 1)[0]}.{match[0]}"
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.0)
    return match[0] if match else ""


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _type_name(value) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def validate(config: dict, defaults: dict, prefix: str = "") -> None:
    """Raise ConfigError for the first key of ``config`` unknown to ``defaults`` or of the wrong type."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            hint = _closest(path, ROOT_DEFAULTS)
            raise ConfigError(f"unknown config key config.{path}" + (f"; did you mean config.{hint}?" if hint else ""))
        default = defaults[key]
        if not _type_ok(default, value):
            raise ConfigError(f"config.{path} must be {_article(_type_name(default))}, got {shown(value)}")
        if isinstance(default, dict) and isinstance(value, dict):
            validate(value, default, path + ".")


def _set(config: dict, path: str, value) -> None:
    for alias, target in KEY_ALIASES.items():
        if path.startswith(alias):
            path = target + path[len(alias):]
    node, defaults = config, ROOT_DEFAULTS
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(defaults, dict) or part not in defaults:
            hint = _closest(".".join(parts[: depth + 1]), ROOT_DEFAULTS)
            raise ConfigError(f"unknown config key config.{path}" + (f"; did you mean config.{hint}?" if hint else ""))
        if depth == len(parts) - 1:
            if not _type_ok(defaults[part], value):
                raise ConfigError(f"config.{path} must be {_article(_type_name(defaults[part]))}, got {shown(value)}")
            node[part] = value
        else:
            node = node.setdefault(part, {})
            defaults = defaults[part]


def _load_defaults() -> tuple[dict, dict]:
    with open(CONFIG_DIR / "defaults.yaml") as f:
        text = f.read()
    loaded = OmegaConf.to_container(OmegaConf.create(text))
    return loaded["config"], loaded["ranges"]


ROOT_DEFAULTS, RANGES = _load_defaults()
_RANGE = re.compile(r"^\s*(?:(>=?)\s*(\S+)|([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])]))\s*$")


def _in_range(value, rule: str) -> bool:
    match = _RANGE.match(rule)
    if match is None:
        raise AssertionError(f"defaults.yaml ranges: cannot read {rule!r}")
    if isinstance(value, (list, tuple)):
        return all(_in_range(item, rule) for item in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True  # the type check has spoken already
    if not math.isfinite(value):  # inf passes "> 0"; no key takes an infinite or NaN value
        return False
    if match.group(1):
        bound = float(match.group(2))
        return value > bound if match.group(1) == ">" else value >= bound
    low, high = float(match.group(4)), float(match.group(5))
    return ((value >= low) if match.group(3) == "[" else (value > low)) and (
        (value <= high) if match.group(6) == "]" else (value < high))


def _matching(config: dict, pattern: list[str], prefix: str = ""):
    """(dotted path, value) of every key of ``config`` that the dotted ``pattern`` (with *) names."""
    if not pattern:
        yield prefix[:-1], config
        return
    if not isinstance(config, dict):
        return
    head, rest = pattern[0], pattern[1:]
    for key in (config if head == "*" else [head]):
        if key in config:
            yield from _matching(config[key], rest, f"{prefix}{key}.")


def check_ranges(config: dict) -> None:
    """Raise ConfigError for the first value outside its range in defaults.yaml (``ranges``)."""
    for pattern, rule in RANGES.items():
        for path, value in _matching(config, pattern.split(".")):
            if value is not None and not _in_range(value, rule):
                raise ConfigError(f"config.{path}={shown(value)} is out of range: it must be {rule.strip()}")


def _interpolations(node, prefix: str = ""):
    """The dotted path of every string value holding ``${``, which OmegaConf would resolve as an interpolation."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _interpolations(child, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for index, child in enumerate(node):
            yield from _interpolations(child, f"{prefix}{index}.")
    elif isinstance(node, str) and "${" in node:
        yield prefix[:-1]


def check_config(config: dict) -> DictConfig:
    """Validate a whole config dict (from the command line or a checkpoint) and return it read-only: every key
    known and of its type, every value in its range, the method a real one, and no ``${...}`` (values are
    taken literally; OmegaConf would read it as an interpolation of another key or an environment variable)."""
    validate(config, ROOT_DEFAULTS)
    check_ranges(config)
    interpolated = next(_interpolations(config), None)
    if interpolated is not None:
        raise ConfigError(f"config.{interpolated} holds '${{': fastssl takes values literally and refuses OmegaConf "
                          "interpolations (write the value itself)")
    losses = sorted(key for key in ROOT_DEFAULTS["LOSS"] if key != "name")
    if config["LOSS"]["name"] not in losses:
        hint = difflib.get_close_matches(config["LOSS"]["name"], losses, n=1)
        raise ConfigError(f"config.LOSS.name {shown(config['LOSS']['name'])} is not a method: one of "
                          f"{', '.join(losses)}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    result = OmegaConf.create(config)
    OmegaConf.set_readonly(result, True)
    return result


def compose_config(argv: list[str]) -> DictConfig:
    """Compose defaults + seed files + command-line values and validate every key.

    Returns the ``config`` node as a read-only DictConfig. Raises ConfigError on bad input. A key given twice
    on the command line takes its last value, and says so.
    """
    groups, assignments = split_arguments(argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="defaults", overrides=groups)
    except Exception as error:  # Hydra's own message names the missing file or group
        raise ConfigError(str(error).splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    config = OmegaConf.to_container(composed, resolve=True)
    config.pop("ranges", None)  # defaults.yaml's value ranges, not a config key
    unexpected = sorted(set(config) - {"config"})
    if unexpected:
        raise ConfigError(f"config files must put their keys under config:, found {unexpected[0]!r}")
    config = config["config"]
    validate(config, ROOT_DEFAULTS)
    given = {}
    for path, text in assignments:
        if path in given and given[path] != text:
            notice(f"config.{path} is given twice: the last value, {shown(text)}, wins over {shown(given[path])}")
        given[path] = text
        _set(config, path, parse_value(text))
    return check_config(config)  # a mapping set whole from the command line is checked key by key
