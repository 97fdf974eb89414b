"""Initial weights (VISSL's MODEL.WEIGHTS_INIT): read a weights file as data, find its state dict, rename it
to fastssl's names and copy what matches into a model.

The steps are VISSL's (vissl/utils/checkpoint.py, init_model_from_consolidated_weights):

1. Read PARAMS_FILE with ``torch.load(weights_only=True)``: tensors and plain containers only, so that a
   file from anywhere cannot run code when it is read.
2. Pick the state dict by STATE_DICT_KEY_NAME. "classy_state_dict": a VISSL checkpoint, whose
   ``classy_state_dict.base_model.model`` holds a "trunk" and a "heads" dict (a fastssl checkpoint, which
   has no such key, gives its "model" entry instead). "": the file is a flat {name: tensor} dict. Any
   other key: the file is {key: {name: tensor}} (BYOL-PyTorch's "online_backbone").
3. For the last two only, as in VISSL: REMOVE_PREFIX is taken off the names that start with it, then
   APPEND_PREFIX is put before every name ("trunk._feature_blocks." for a torchvision ResNet).
4. VISSL's names become fastssl's (``fastssl_name``).
5. Each model tensor whose name contains a SKIP_LAYERS entry keeps its value; each other one is copied
   from the file where the file has it, with the same shape.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

VISSL_KEY = "classy_state_dict"
FASTSSL_KEYS = {"model", "step"}  # a fastssl checkpoint: "model" is the SSLModel's state dict (checkpoint.py)

# fastssl's checkpoints hold two numpy values: numpy's RNG state, an array of uint32 (checkpoint.rng_state),
# and the learning rate the loop wrote into the optimizer's param groups, a float64 scalar read from the
# schedule array. These names rebuild arrays and scalars of those two dtypes from their shape and bytes, and
# nothing else: other dtypes, and any other class or function, are still refused. (The two functions are
# reached through a reduce because their module is numpy.core or numpy._core depending on numpy's version.)
NUMPY_GLOBALS_OF_FASTSSL_CHECKPOINTS = [
    np.empty(0).__reduce__()[0], np.ndarray, np.float64(0).__reduce__()[0],
    np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
]

_REFUSED = re.compile(r"(?:GLOBAL |but got <class ')([\w.]+)")


def read_weights_file(path: str | Path) -> dict:
    """The file's contents on the CPU, read with weights_only=True (and the numpy values of fastssl's checkpoints).

    Raises FileNotFoundError for a missing file and a one-line ValueError for a file that needs more than
    tensors and plain containers, or that torch cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS_OF_FASTSSL_CHECKPOINTS):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _REFUSED.search(str(error))
        if refused is None:  # not a pickle of tensors at all (a text file, a truncated file)
            detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ValueError(f"cannot read weights file {path} with torch.load(weights_only=True): {detail}") from None
        raise ValueError(f"weights file {path} holds more than tensors and plain containers ({refused.group(1)}): "
                         "it is read with torch.load(weights_only=True) so that it cannot run code; save the state "
                         "dict alone, torch.save(model.state_dict(), path)") from None
    except Exception as error:  # not a torch file: torch raises KeyError, RuntimeError, EOFError...
        raise ValueError(f"cannot read weights file {path}: {type(error).__name__} {error}".splitlines()[0]) from None
    if not isinstance(contents, dict):
        raise ValueError(f"weights file {path} holds a {type(contents).__name__}, not a dict")
    return contents


def select_state_dict(contents: dict, *, state_dict_key_name: str | None) -> tuple[dict, bool]:
    """(the {name: tensor} dict that STATE_DICT_KEY_NAME picks, whether it is named by its trainer).

    Named by its trainer (VISSL's classy_state_dict, a fastssl checkpoint): names start with "trunk." and
    "heads." already, and the prefix options do not apply. Entries that are not tensors are left out.
    """
    if state_dict_key_name == VISSL_KEY and VISSL_KEY not in contents and FASTSSL_KEYS <= contents.keys():
        return _tensors(contents["model"]), True
    if state_dict_key_name and state_dict_key_name not in contents:
        raise ValueError(f"STATE_DICT_KEY_NAME {state_dict_key_name!r} is not in the weights file, whose keys are "
                         f"{_first(contents)} (\"\" reads a flat {{name: tensor}} file)")
    if state_dict_key_name == VISSL_KEY:
        try:
            model = contents[VISSL_KEY]["base_model"]["model"]
        except (KeyError, TypeError):
            raise ValueError(f"{VISSL_KEY} has no base_model.model dict, as VISSL's checkpoints do") from None
        named = {f"trunk.{name}": value for name, value in model.get("trunk", {}).items()}
        named.update({f"heads.{name}": value for name, value in model.get("heads", {}).items()})
        return _tensors(named), True
    picked = contents[state_dict_key_name] if state_dict_key_name else contents
    if not isinstance(picked, dict):
        raise ValueError(f"STATE_DICT_KEY_NAME {state_dict_key_name!r} holds a {type(picked).__name__}, not a dict")
    return _tensors(picked), False


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _first(names, count: int = 3) -> str:
    names = list(names)
    return ", ".join(map(str, names[:count])) + (", ..." if len(names) > count else "") if names else "(none)"


def change_prefixes(state: dict, *, remove_prefix: str | None, append_prefix: str | None) -> dict:
    """VISSL's REMOVE_PREFIX (taken off each name that starts with it), then APPEND_PREFIX (before every name)."""
    if remove_prefix:
        state = {name[len(remove_prefix):] if name.startswith(remove_prefix) else name: value
                 for name, value in state.items()}
    if append_prefix:
        state = {append_prefix + name: value for name, value in state.items()}
    return state


def fastssl_name(name: str, *, trunk_children: tuple[str, ...] = ()) -> str:
    """A VISSL (or torchvision, once prefixed) parameter name as fastssl's model names it.

    Trunk: VISSL wraps torchvision's ResNet modules (conv1, bn1, layer1..layer4) in ``_feature_blocks``, and
    a feature-extraction trunk in ``base_model``; fastssl's trunk has torchvision's modules directly. A
    child numbered as in ``nn.Sequential(*resnet.children())`` (BYOL-PyTorch's backbone) is given the name
    of that child of fastssl's trunk: ``trunk_children`` lists them in order (conv1, bn1, relu, maxpool,
    layer1, ... for ResNet, as torchvision's). Heads: VISSL's mlp keeps its layers in ``clf``, and its
    swav_head names its prototypes ``prototypes0``, fastssl's ``prototypes.0``.
    """
    if name.startswith("trunk."):
        rest = re.sub(r"^(base_model\.)?(_feature_blocks\.)?", "", name[len("trunk."):])
        index, _, tail = rest.partition(".")
        if index.isdigit() and int(index) < len(trunk_children):
            rest = f"{trunk_children[int(index)]}.{tail}"
        return "trunk." + rest
    name = re.sub(r"^heads\.(\d+)\.clf\.", r"heads.\1.", name)
    return re.sub(r"^heads\.(\d+)\.prototypes(\d+)\.", r"heads.\1.prototypes.\2.", name)


def vissl_name(name: str) -> str:
    """fastssl's parameter name as VISSL's model names it (the inverse of ``fastssl_name`` for ResNet trunks
    and fastssl's heads: an mlp's layers are numbered, a swav_head's are named)."""
    if name.startswith("trunk."):
        return "trunk._feature_blocks." + name[len("trunk."):]
    name = re.sub(r"^heads\.(\d+)\.prototypes\.(\d+)\.", r"heads.\1.prototypes\2.", name)
    return re.sub(r"^heads\.(\d+)\.(\d+)\.", r"heads.\1.clf.\2.", name)


@dataclass
class LoadReport:
    """What ``load_initial_weights`` did, by model tensor name (unexpected: by the file's name, renamed)."""

    source: str
    loaded: list[str]
    skipped: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        line = (f"initial weights from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")
        if self.missing:
            line += f"; missing {_first(self.missing)}"
        if self.unexpected:
            line += f"; unexpected {_first(self.unexpected)}"
        return line


def match_state_dict(model_state: dict, state: dict, *, skip_layers: list[str], source: str) -> LoadReport:
    """Which model tensors the file's ``state`` (fastssl's names) sets. Raises a one-line ValueError when a
    shape differs, or when nothing matches (naming the first names on each side)."""
    skipped = [name for name in model_state if any(part in name for part in skip_layers)]
    skipped_set = set(skipped)
    kept = [name for name in model_state if name not in skipped_set]
    loaded = [name for name in kept if name in state]
    for name in loaded:
        if state[name].shape != model_state[name].shape:
            raise ValueError(f"{name} has shape {tuple(state[name].shape)} in {source} but "
                             f"{tuple(model_state[name].shape)} in the model; SKIP_LAYERS can leave it out")
    if not loaded:
        raise ValueError(f"no tensor of {source} matches the model: the file has {_first(state)}, the model has "
                         f"{_first(kept)}; set STATE_DICT_KEY_NAME, REMOVE_PREFIX or APPEND_PREFIX")
    return LoadReport(source=source, loaded=loaded, skipped=skipped, missing=[n for n in kept if n not in state],
                      unexpected=[name for name in state if name not in model_state])


def load_initial_weights(model: nn.Module, *, params_file: str, state_dict_key_name: str | None,
                         skip_layers: list[str], remove_prefix: str | None, append_prefix: str | None) -> LoadReport:
    """Copy the tensors of ``params_file`` that match into ``model`` (an SSLModel, on any device) in place.

    The arguments are MODEL.WEIGHTS_INIT's keys (see the module docstring). Tensors are converted to the
    model's dtype, device and memory format. Called when the run is built: a resumed run then restores its
    own checkpoint over these weights. Returns the report; raises ValueError (one line) on bad input.
    """
    contents = read_weights_file(params_file)
    state, named_by_trainer = select_state_dict(contents, state_dict_key_name=state_dict_key_name)
    if not named_by_trainer:
        state = change_prefixes(state, remove_prefix=remove_prefix, append_prefix=append_prefix)
    trunk = getattr(model, "trunk", None)
    children = tuple(name for name, _ in trunk.named_children()) if trunk is not None else ()
    state = {fastssl_name(name, trunk_children=children): value for name, value in state.items()}
    model_state = model.state_dict()
    report = match_state_dict(model_state, state, skip_layers=list(skip_layers),
                              source=f"{params_file} [{state_dict_key_name or 'flat'}]")
    with torch.no_grad():
        for name in report.loaded:
            model_state[name].copy_(state[name])
    return report
