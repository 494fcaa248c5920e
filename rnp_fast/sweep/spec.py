"""Sweep files: a YAML grid of fixed values and axes, checked in full and expanded into jobs.

A sweep file has four top-level keys::

    name: digits-attacks            # optional, for the log
    keep_purified: false            # optional: keep each job's purified model (off: saves disk)
    fixed:                          # values shared by every job, one mapping per config section
      data: {dataset: digits, ratio: 0.3}
      model: {arch: resnet18, width: 0.125}
      trigger: {blend: {alpha: 0.2}}   # attack parameters, per attack name
    axes:                           # one list per varied key: jobs are their cartesian product
      attack.attack: [badnets, blend, sig]
      seed: [0, 1]
      rnp.alpha: [0.2, 0.5]

Keys are paths: ``SECTION.FIELD`` for the fields of the config dataclasses (sections ``model``,
``data``, ``attack``, ``train``, ``rnp``, ``engine``), ``trigger.ATTACK.PARAM`` for an attack's own
parameters (used only by jobs of that attack), and ``seed``, which sets both the data seed and the
poisoning seed. Everything is checked before any job starts; a problem is reported as
``FILE: KEY: reason`` on one line.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path

from rnp_fast.attacks import TRIGGERS, trigger_parameters
from rnp_fast.config import SECTIONS as CONFIG_CLASSES
from rnp_fast.config import AttackConfig, not_identity, seed_paths
from rnp_fast.errors import UserError
from rnp_fast.rule_power import check_known_dataset
from rnp_fast.sweep.job import Job
from rnp_fast.sweep.sweep_file import SweepFileError, read_yaml

TOP_LEVEL = ("name", "keep_purified", "fixed", "axes")


@dataclass
class Sweep:
    name: str
    keep_purified: bool
    jobs: list[Job]


MAX_JOBS = 10_000


def load_sweep(path: str | Path, max_jobs: int = MAX_JOBS) -> Sweep:
    """Read, check and expand a sweep file; raises UserError before any job could start. The
    number of jobs is counted from the axes' lengths before anything is expanded."""
    path = Path(path)
    source = str(path)
    document = read_yaml(path)
    check_mapping(document, source, "", TOP_LEVEL)
    fixed = flatten(optional(document, "fixed"), source)
    axes = read_axes(optional(document, "axes"), source)
    count = math.prod(len(values) for values in axes.values())
    if count > max_jobs:
        sizes = " x ".join(str(len(values)) for values in axes.values())
        raise SweepFileError(source, "axes", f"{sizes} = {count:,} jobs, more than --max-jobs {max_jobs:,}")
    check_values(fixed, axes, source)
    name = document.get("name", path.stem)
    keep = document.get("keep_purified", False)
    if not isinstance(name, str):
        raise SweepFileError(source, "name", f"expected a string, got {describe(name)}")
    if not isinstance(keep, bool):
        raise SweepFileError(source, "keep_purified", f"expected true or false, got {describe(keep)}")
    return Sweep(name, keep, expand(fixed, axes, source))


def optional(document: dict, key: str):
    """A section that may be left out or left empty (``axes:`` with nothing under it)."""
    value = document.get(key)
    return {} if value is None else value


def check_values(fixed: dict, axes: dict[str, list], source: str) -> None:
    for key, value in fixed.items():
        check_value(key, value, source, f"fixed.{key}")
    for key, values in axes.items():
        if key in fixed:
            raise SweepFileError(source, f"axes.{key}", "also set under fixed")
        for value in values:
            check_value(key, value, source, f"axes.{key}")
    check_seed_paths(fixed, axes, source)


def check_mapping(value, source: str, key: str, allowed) -> None:
    if not isinstance(value, dict):
        raise SweepFileError(source, key or "(top level)", f"expected a mapping, got {describe(value)}")
    for name in value:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise SweepFileError(source, where, f"unknown key (valid: {', '.join(allowed)})")


def flatten(mapping, source: str, prefix: str = "") -> dict:
    """``{data: {seed: 0}}`` (or ``{data.seed: 0}``) under ``fixed`` -> ``{"data.seed": 0}``, paths checked."""
    if not isinstance(mapping, dict):
        where = f"fixed.{prefix}" if prefix else "fixed"
        raise SweepFileError(source, where, f"expected a mapping, got {describe(mapping)}")
    flat = {}
    for name, value in mapping.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if path_kind(path) == "group":
            flat.update(flatten(value, source, path))
        else:
            check_path(path, source, f"fixed.{path}")
            flat[path] = value
    return flat


def read_axes(mapping, source: str) -> dict[str, list]:
    if not isinstance(mapping, dict):
        raise SweepFileError(source, "axes", f"expected a mapping of keys to lists, got {describe(mapping)}")
    axes = {}
    for name, values in mapping.items():
        path = str(name)
        check_path(path, source, f"axes.{path}")
        if not isinstance(values, list):
            raise SweepFileError(source, f"axes.{path}", f"expected a list of values, got {describe(values)}")
        if not values:
            raise SweepFileError(source, f"axes.{path}", "empty axis (give at least one value)")
        axes[path] = values
    return axes


def path_kind(path: str) -> str:
    """group (a section or trigger.ATTACK: holds more keys), field, trigger, seed, or unknown."""
    parts = path.split(".")
    if path in CONFIG_CLASSES or path == "trigger" or (len(parts) == 2 and parts[0] == "trigger"):
        return "group"
    if path == "seed":
        return "seed"
    if len(parts) == 2 and parts[0] in CONFIG_CLASSES:
        return "field"
    if len(parts) == 3 and parts[0] == "trigger":
        return "trigger"
    return "unknown"


def check_path(path: str, source: str, key: str) -> None:
    kind = path_kind(path)
    parts = path.split(".")
    if kind == "unknown" or kind == "group":
        valid = "seed, SECTION.FIELD or trigger.ATTACK.PARAM; sections: " + ", ".join(CONFIG_CLASSES)
        raise SweepFileError(source, key, f"unknown key (valid: {valid})")
    if kind == "field":
        names = [f.name for f in fields(CONFIG_CLASSES[parts[0]])]
        if parts[1] not in names:
            raise SweepFileError(source, key, f"unknown key (valid in {parts[0]}: {', '.join(names)})")
        if parts[1] in not_identity(parts[0]):  # where a job runs, not what it computes
            raise SweepFileError(
                source, key, "cannot be set in a sweep file: the backend decides where and how quietly jobs run"
            )
    if kind == "trigger":
        attack, parameter = parts[1], parts[2]
        if attack not in TRIGGERS:
            raise SweepFileError(source, key, f"unknown attack {attack!r} (valid: {', '.join(TRIGGERS)})")
        allowed = trigger_parameters(attack)
        if parameter not in allowed:
            valid = ", ".join(allowed) or "none"
            raise SweepFileError(source, key, f"attack {attack!r} has no parameter {parameter!r} (valid: {valid})")


def check_seed_paths(fixed: dict, axes: dict, source: str) -> None:
    if "seed" in fixed or "seed" in axes:
        for path in seed_paths():
            if path in fixed or path in axes:
                where = f"fixed.{path}" if path in fixed else f"axes.{path}"
                raise SweepFileError(source, where, "conflicts with seed (which sets data.seed and attack.poison_seed)")


def field_type(path: str) -> str | None:
    """The dataclass annotation of a field path (a string: the config modules use postponed annotations)."""
    section, name = path.split(".")
    return next(str(f.type) for f in fields(CONFIG_CLASSES[section]) if f.name == name)


def check_value(path: str, value, source: str, key: str) -> None:
    """Type check one value (the attack checks its parameters' values when a job builds its trigger)."""
    expected = "int" if path == "seed" else field_type(path) if path_kind(path) == "field" else None
    if expected is not None and not fits_type(value, expected):
        raise SweepFileError(source, key, f"expected {expected}, got {describe(value)}")
    scalar = value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool))
    if path_kind(path) == "trigger" and not scalar:
        raise SweepFileError(source, key, f"expected a number, a string or null, got {describe(value)}")
    if path == "attack.attack" and value not in TRIGGERS:
        raise SweepFileError(source, key, f"unknown attack {SHORT_REPR.repr(value)} (valid: {', '.join(TRIGGERS)})")


def fits_type(value, expected: str) -> bool:
    """Does a YAML value fit a dataclass annotation (written as a string: postponed annotations)?"""
    if expected.endswith(" | None"):
        return value is None or fits_type(value, expected.removesuffix(" | None"))
    sequence = re.fullmatch(r"(?:tuple\[(\w+), \.\.\.\]|list\[(\w+)\])", expected)
    if sequence:
        return isinstance(value, list) and all(fits_type(v, sequence[1] or sequence[2]) for v in value)
    if expected == "bool":
        return isinstance(value, bool)
    if expected == "int":  # YAML's true/false are bools, which Python also counts as ints
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == "str":
        return isinstance(value, str)
    return True  # a type this checker does not know: the dataclass's own validation decides


def short_repr() -> reprlib.Repr:
    """A repr that looks at a bounded part of a value (three levels, four items each), however big."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxlist, bounded.maxdict, bounded.maxtuple, bounded.maxset = 3, 4, 4, 4, 4
    bounded.maxstring = bounded.maxother = bounded.maxlong = 40
    return bounded


SHORT_REPR = short_repr()


def describe(value) -> str:
    """The type and the start of a value for an error line; never walks more than a few items."""
    text = SHORT_REPR.repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def expand(fixed: dict, axes: dict[str, list], source: str) -> list[Job]:
    """Cartesian product of the axes (the last axis varies fastest); jobs that resolve to the same
    configuration (e.g. a blend parameter on a badnets job) are kept once."""
    jobs, seen = [], set()
    for combination in itertools.product(*axes.values()):
        varied = dict(zip(axes, combination, strict=True))
        job = build_job({**fixed, **varied}, varied, source)
        if job.hash not in seen:
            seen.add(job.hash)
            jobs.append(job)
    return jobs


def build_job(values: dict, varied: dict, source: str) -> Job:
    sections: dict[str, dict] = {name: {} for name in CONFIG_CLASSES}
    for path, value in values.items():
        if path == "seed":
            sections["data"]["seed"] = sections["attack"]["poison_seed"] = value
        elif path_kind(path) == "field":
            section, name = path.split(".")
            is_tuple = isinstance(value, list) and field_type(path).startswith("tuple")
            sections[section][name] = tuple(value) if is_tuple else value
    attack = sections["attack"].get("attack", AttackConfig.attack)
    sections["attack"]["attack_param"] = attack_params(attack, values, sections["attack"], source)
    configs = {}
    for name, cls in CONFIG_CLASSES.items():
        try:
            configs[name] = cls(**sections[name])
        except UserError as error:
            raise SweepFileError(source, name, f"{error} (in the job {describe_job(varied)})") from None
    try:  # the threshold rule's images, counted before any job starts (datasets of known size)
        check_known_dataset(configs["data"], configs["rnp"])
    except UserError as error:
        raise SweepFileError(source, "data", f"{error} (in the job {describe_job(varied)})") from None
    return Job(**configs, varied=varied)


def attack_params(attack: str, values: dict, section: dict, source: str) -> list[str]:
    """The job's ``trigger.ATTACK.PARAM`` values as ``--attack-param`` KEY=VALUE items (which read back
    numbers and none as such), after any items the file gave in ``attack.attack_param``."""
    items = list(section.get("attack_param", []))
    prefix = f"trigger.{attack}."
    items += [f"{path.removeprefix(prefix)}={value}" for path, value in values.items() if path.startswith(prefix)]
    given = {item.partition("=")[0] for item in items}
    for name in required_parameters(attack):
        if name not in given:
            raise SweepFileError(source, f"{prefix}{name}", f"attack {attack!r} needs this parameter")
    return items


def required_parameters(attack: str) -> list[str]:
    """Parameters the attack has no default for (a user trigger's pattern file, ...)."""
    signature = inspect.signature(TRIGGERS[attack]).parameters
    return [name for name in trigger_parameters(attack) if signature[name].default is inspect.Parameter.empty]


def describe_job(varied: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in varied.items()) or "of the fixed values"
