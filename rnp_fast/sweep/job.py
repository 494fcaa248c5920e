"""One job of a sweep: the resolved configuration of a backdoored model and its defense.

A job is identified by a hash of its configuration, and its backdoored model by a hash of the part
of the configuration that training reads: jobs that differ only in RNP or engine settings share one
trained model. Settings that say where a job runs, not what it computes (device, progress output),
are left out of both hashes, so a sweep resumed on another machine recognises its finished jobs.

The number of torch's intra-op CPU threads is part of a job: it changes the order in which floats
are summed, hence the trained model and every metric. Each job runs with ``threads`` threads on
every backend (its process, a worker process, a Ray task), so one hash means one computation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

from rnp_fast.config import (
    SECTIONS,
    TRAIN_ENGINE_FIELDS,
    AttackConfig,
    DataConfig,
    EngineConfig,
    ModelConfig,
    RNPConfig,
    TrainConfig,
    not_identity,
)

JOB_THREADS = 1  # one per job: what a Ray task's one CPU holds; more jobs at once use more cores
# Data fields that only the defense reads (its subset of the training set, and evaluation batches).
DEFENSE_ONLY_DATA = ("ratio", "holdout", "shuffle", "eval_batch_size")


@dataclass(frozen=True)
class Job:
    model: ModelConfig
    data: DataConfig
    attack: AttackConfig
    train: TrainConfig
    rnp: RNPConfig
    engine: EngineConfig
    varied: dict = field(default_factory=dict, compare=False)  # this job's value on each axis
    threads: int = JOB_THREADS  # torch's intra-op threads (torch.set_num_threads) while it runs

    def config(self) -> dict:
        """Every setting, by section (what the store keeps and the report groups by)."""
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    @cached_property
    def hash(self) -> str:
        config = without_unset_later_fields(self.config())
        for section in SECTIONS:
            for name in not_identity(section):
                config[section].pop(name)
        return digest(with_threads(config, self.threads))

    @cached_property
    def train_hash(self) -> str:
        config = without_unset_later_fields(self.config())
        config["data"] = {k: v for k, v in config["data"].items() if k not in DEFENSE_ONLY_DATA}
        training = set(TRAIN_ENGINE_FIELDS) - set(not_identity("engine"))  # precision, compile, layout
        config["engine"] = {k: v for k, v in config["engine"].items() if k in training}
        training = {name: config[name] for name in ("model", "data", "attack", "train", "engine")}
        return digest(with_threads(training, self.threads))

    def label(self) -> str:
        """Short description for log lines: the axis values, or the hash when nothing varies."""
        return " ".join(f"{key}={value}" for key, value in self.varied.items()) or self.hash


def without_unset_later_fields(config: dict) -> dict:
    """Fields added after stores existed are left out of the hashes while unset, so a store made
    before them still recognises its finished jobs."""
    if not config["model"].get("arch_kwargs"):
        config["model"].pop("arch_kwargs", None)
    if not config["rnp"].get("allow_small_holdout"):
        config["rnp"].pop("allow_small_holdout", None)
    return config


def with_threads(config: dict, threads: int) -> dict:
    """The thread count joins a hash unless it is JOB_THREADS: hashes from before jobs had a thread
    count stay valid (those jobs ran with whatever threads their process had; their rows have no
    ``threads``)."""
    return config if threads == JOB_THREADS else {**config, "threads": threads}


def digest(config: dict) -> str:
    """16 hex digits of SHA-256 over canonical JSON (64 bits: collisions need ~4e9 jobs)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
