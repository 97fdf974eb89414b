"""Config fuzz: random single-key mutations of the seed configs, each of which must be refused before training
with a one-line error that names the key (exit status 2, no traceback).

A mutation is one extra ``config.KEY=VALUE`` word after a seed's ``config=...``, of one of these kinds:
  misspelt      a key at any depth with one letter changed, dropped, doubled or two letters swapped
  transform     a misspelt key inside one DATA.TRAIN.TRANSFORMS entry (the list set whole)
  head          a misspelt key inside one MODEL.HEAD.PARAMS entry (the list set whole)
  type          a value of the wrong type (a word for a number, a number for a word or a list, a list for a bool)
  range         an out-of-range value with a declared range (non-positive epochs, batch sizes, temperatures,
                epsilons, negative queue lengths, momenta outside [0, 1), ...)
  crop_scale    a crop scale outside (0, 1] inside the transforms
  crop_count    crop counts that do not add up (total_num_crops against num_crops)
  loss_name     an unknown LOSS.name

Every mutation goes through fastssl-train's own ``main`` with ``--cfg job`` (compose, validate and check the
whole job without training: the same checks a training command runs before it starts a process), in this
process for speed (tests/fastssl/test_train_cli.py runs the console script itself on a misspelt key).
Each unmutated seed must pass the same check (otherwise the fuzz would prove nothing).
"""
from __future__ import annotations

import contextlib
import io
import random
import string
from dataclasses import dataclass

import yaml

from fastssl.config import CONFIG_DIR, RANGES, ROOT_DEFAULTS, compose_config

KINDS = ("misspelt", "transform", "head", "type", "range", "crop_scale", "crop_count", "loss_name")


@dataclass
class Mutation:
    seed: str        # config=... of the seed recipe
    kind: str
    word: str        # the config.KEY=VALUE override
    names: str       # what the error must name (the key, or the transform key)

    def argv(self) -> list[str]:
        return [f"config={self.seed}", self.word]


@dataclass
class Outcome:
    mutation: Mutation
    status: int
    error: str       # the error line(s) printed
    passed: bool
    why: str


def seed_recipes() -> list[str]:
    """Every seed recipe under configs/config (pretrain and benchmark)."""
    root = CONFIG_DIR / "config"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if len(p.relative_to(root).parts) == 3)


def _flow(value) -> str:
    """A value as one line of YAML flow style, as a user types it on the command line."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()


def _misspell(word: str, rng: random.Random) -> str:
    """One edit of ``word`` that gives another word (a change, a drop, a double or a swap of letters)."""
    for _ in range(100):
        i = rng.randrange(len(word))
        edit = rng.choice(("change", "drop", "double", "swap"))
        if edit == "change":
            out = word[:i] + rng.choice(string.ascii_lowercase if word[i].islower() else string.ascii_uppercase) \
                + word[i + 1:]
        elif edit == "drop" and len(word) > 1:
            out = word[:i] + word[i + 1:]
        elif edit == "double":
            out = word[:i] + word[i] + word[i:]
        else:
            j = min(i + 1, len(word) - 1)
            out = word[:i] + word[j] + word[i] + word[j + 1:] if j != i else word
        if out != word and out.isidentifier():
            return out
    return word + "x"


def _leaves(node, prefix: str = ""):
    """(dotted path, value) of every key of a config tree, mappings included."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")


def _default_at(path: str):
    """The default of a dotted key in defaults.yaml (None where it has none)."""
    node = ROOT_DEFAULTS
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class MutationMaker:
    """Draws mutations of one seed's composed config."""

    def __init__(self, seed: str, rng: random.Random):
        from omegaconf import OmegaConf

        self.seed, self.rng = seed, rng
        self.config = OmegaConf.to_container(compose_config([f"config={seed}"]))
        self.paths = [(p, v) for p, v in _leaves(self.config) if not p.startswith("HOOKS")]

    def make(self, kind: str) -> Mutation | None:
        return getattr(self, f"_{kind}")()

    def _mutation(self, kind: str, key: str, value, names: str) -> Mutation:
        return Mutation(self.seed, kind, f"config.{key}={value if isinstance(value, str) else _flow(value)}", names)

    def _misspelt(self):
        path, value = self.rng.choice(self.paths)
        parts = path.split(".")
        depth = self.rng.randrange(len(parts))
        parts[depth] = _misspell(parts[depth], self.rng)
        leaf = value if depth == len(parts) - 1 else 1
        return self._mutation("misspelt", ".".join(parts), _flow(leaf) if not isinstance(leaf, dict) else "1",
                              parts[depth])

    def _transforms(self):
        return self.config["DATA"]["TRAIN"]["TRANSFORMS"]

    def _transform(self):
        transforms = [dict(t) for t in self._transforms()]
        candidates = [i for i, t in enumerate(transforms) if len(t) > 1]
        if not candidates:
            return None
        i = self.rng.choice(candidates)
        key = self.rng.choice([k for k in transforms[i] if k != "name"])
        transforms[i] = {(_misspell(key, self.rng) if k == key else k): v for k, v in transforms[i].items()}
        bad = next(k for k in transforms[i] if k not in self._transforms()[i])
        return self._mutation("transform", "DATA.TRAIN.TRANSFORMS", transforms, bad)

    def _head(self):
        heads = [[name, dict(kwargs)] for name, kwargs in self.config["MODEL"]["HEAD"]["PARAMS"]]
        if not heads:
            return None
        i = self.rng.randrange(len(heads))
        key = self.rng.choice(sorted(heads[i][1]))
        bad = _misspell(key, self.rng)
        heads[i][1] = {(bad if k == key else k): v for k, v in heads[i][1].items()}
        return self._mutation("head", "MODEL.HEAD.PARAMS", heads, bad)

    def _type(self):
        # The declared type is the default's (defaults.yaml): a seed may write -1 for a float key.
        typed = [(p, _default_at(p)) for p, _ in self.paths]
        typed = [(p, v) for p, v in typed if isinstance(v, (bool, int, float, str, list)) and v is not None]
        path, value = self.rng.choice(typed)
        if isinstance(value, bool):
            wrong = self.rng.choice(["[1, 2]", "maybe", "{a: 1}"])
        elif isinstance(value, (int, float)):
            wrong = self.rng.choice(["fast", "[1, 2]", "{a: 1}"] + (["0.5"] if isinstance(value, int) else []))
        elif isinstance(value, str):
            wrong = self.rng.choice(["[1, 2]", "{a: 1}", "3", "True"])
        else:
            wrong = self.rng.choice(["7", "word", "{a: 1}"])
        return self._mutation("type", path, wrong, path.rsplit(".", 1)[-1])

    def _range(self):
        from fastssl.config import _matching

        ranged = [(path, rule) for pattern, rule in RANGES.items()
                  for path, value in _matching(self.config, pattern.split(".")) if value is not None]
        if not ranged:
            return None
        path, rule = self.rng.choice(ranged)
        rule = rule.strip()
        if rule.startswith(">="):
            bad = float(rule[2:]) - self.rng.choice([1, 3, 100])
        elif rule.startswith(">"):
            bad = float(rule[1:]) - self.rng.choice([0, 1, 5])
        else:  # an interval: just past one end
            low, high = (float(x) for x in rule[1:-1].split(","))
            bad = self.rng.choice([low - 0.5, high if rule.endswith(")") else high + 0.5])
        current = dict(self.paths)[path]
        if isinstance(current, int) and not isinstance(current, bool) and float(bad).is_integer():
            bad = int(bad)
        return self._mutation("range", path, _flow(bad), path.rsplit(".", 1)[-1])

    def _crop_scale(self):
        transforms = [dict(t) for t in self._transforms()]
        for i, t in enumerate(transforms):
            if t["name"] == "ImgPilToMultiCrop":
                scales = [list(s) for s in t["crop_scales"]]
                g = self.rng.randrange(len(scales))
                scales[g] = self.rng.choice([[0.0, scales[g][1]], [scales[g][0], 1.5], [-0.2, 0.5], [0.5, 0.3]])
                transforms[i] = {**t, "crop_scales": scales}
                return self._mutation("crop_scale", "DATA.TRAIN.TRANSFORMS", transforms, "crop_scales")
            if t["name"] == "RandomResizedCrop":
                transforms[i] = {**t, "scale": self.rng.choice([[0.0, 1.0], [0.2, 1.7], [-0.1, 1.0]])}
                return self._mutation("crop_scale", "DATA.TRAIN.TRANSFORMS", transforms, "scale")
        return None

    def _crop_count(self):
        transforms = [dict(t) for t in self._transforms()]
        for i, t in enumerate(transforms):
            if t["name"] == "ImgPilToMultiCrop":
                if self.rng.random() < 0.5:
                    bad = {**t, "total_num_crops": sum(t["num_crops"]) + self.rng.choice([-1, 1, 3])}
                    names = "total_num_crops"
                else:
                    bad = {**t, "num_crops": list(t["num_crops"]) + [2]}  # a group without a size or scale
                    names = "num_crops"
                transforms[i] = bad
                return self._mutation("crop_count", "DATA.TRAIN.TRANSFORMS", transforms, names)
            if t["name"] == "ImgReplicatePil":  # BYOL's two views
                transforms[i] = {**t, "num_times": self.rng.choice([0, -2])}
                return self._mutation("crop_count", "DATA.TRAIN.TRANSFORMS", transforms, "num_times")
        return None

    def _loss_name(self):
        name = self.config["LOSS"]["name"]
        return self._mutation("loss_name", "LOSS.name", self.rng.choice([_misspell(name, self.rng), "simclr_loss",
                                                                          "moco_loss"]), "LOSS.name")


def draw_mutations(count: int, *, seed: int) -> list[Mutation]:
    """``count`` mutations spread over every seed recipe and every kind (seeded, so reproducible)."""
    rng = random.Random(seed)
    makers = [MutationMaker(s, rng) for s in seed_recipes()]
    found, attempts = [], 0
    while len(found) < count and attempts < 20 * count:
        # Both cycle: every kind meets every seed over len(makers) x len(KINDS) draws (when coprime) and a
        # short fuzz still has every kind and many seeds.
        maker, kind = makers[attempts % len(makers)], KINDS[(attempts + attempts // len(makers)) % len(KINDS)]
        attempts += 1
        mutation = maker.make(kind)
        if mutation is not None and mutation.word not in {m.word for m in found if m.seed == mutation.seed}:
            found.append(mutation)
    return found


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """fastssl-train's main on ``argv`` + --cfg job; (exit status, what it printed to stderr)."""
    from fastssl.train import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main([*argv, "--cfg", "job"])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as error:  # noqa: BLE001 - a traceback is what the fuzz looks for
            import traceback

            return 1, "Traceback (most recent call last):\n" + "".join(traceback.format_exception(error))
    return status, err.getvalue()


def judge(mutation: Mutation, status: int, stderr: str) -> Outcome:
    """Passed: exit 2, no traceback, exactly one line starting 'fastssl-train: error:', naming the key."""
    errors = [line for line in stderr.splitlines() if line.startswith("fastssl-train: error:")]
    error = errors[0] if errors else stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "Traceback" in stderr:
        return Outcome(mutation, status, stderr.strip().splitlines()[-1], False, "traceback")
    if status != 2:
        return Outcome(mutation, status, error, False, f"exit status {status}, not 2")
    if len(errors) != 1:
        return Outcome(mutation, status, error, False, f"{len(errors)} error lines")
    if mutation.names.lower() not in error.lower():
        return Outcome(mutation, status, error, False, f"the error does not name {mutation.names!r}")
    return Outcome(mutation, status, error, True, "")


def fuzz(count: int, *, seed: int) -> tuple[list[Outcome], list[str]]:
    """Run ``count`` mutations in process. Returns the outcomes and the seeds that fail unmutated (should be
    none)."""
    bad_seeds = [s for s in seed_recipes() if run_in_process([f"config={s}"])[0] != 0]
    outcomes = [judge(m, *run_in_process(m.argv())) for m in draw_mutations(count, seed=seed)]
    return outcomes, bad_seeds
