"""Can clean data alone tell whether a model is backdoored, and whether the defense removed it?

Three groups of digits models (the attack table's training recipe, digits_attacks.yaml: ResNet-18,
20 epochs, batch 32, lr 0.05, no augmentation), at widths 0.25 and 0.125 and several seeds:

- clean: the trainer without poisoning (seeds 0-5 at each width);
- backdoored: BadNets, Blend and WaNet, 4 seeds each (all2one, the target class moved with the
  seed), and the bundled demo model (BadNets, target 0, 60 epochs with augmentation);
- purified: the defense's output (`defense.compute_defense`, demo settings) on each backdoored
  model for defense seeds 0 and 1 (the demo model: data seeds 0-9 and seed 0's images in nine
  more orders, where RNP does remove the backdoor), labelled removed (ASR <= 0.1) or not.

Every statistic comes from clean images only (the defender's defense data) or from no data:
the unlearned model's predicted-class histogram (top-class share, entropy; 3 unlearning seeds),
the unlearning trajectory (epochs to the clean-accuracy stop, first epoch's loss and histogram),
whether the collapse class agrees across unlearning seeds and (purified models) with the original
model's, MM-BD's maximum-margin statistic (Wang, Xiang, Miller and Kesidis), and how anomalous the
original model's runner-up class is on clean images (after Gao et al.'s EBBA). Per question, the
ROC AUC with a bootstrap 95 % interval over models and the true-positive rate at a false-positive
rate <= 10 %. Phases, each resumable (models, then one JSON line per measured model):

    OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py train --work W --shard 0/2   # and 1/2
    OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py measure --work W --shard 0/2  # and 1/2
    OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py demo --work W
    python benchmarks/clean_verdict_study.py report --work W \\
        --out benchmarks/results/clean_verdict_digits_cpu.json --markdown TABLE.md
    python benchmarks/clean_verdict_study.py dry-run --work /tmp/tiny   # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rnp_fast import harness
from rnp_fast import train as training
from rnp_fast.config import DataConfig, EngineConfig, RNPConfig
from rnp_fast.data import defense_data
from rnp_fast.defense import DefendJob, compute_defense
from rnp_fast.defense_stages import Inputs
from rnp_fast.demo import DEMO_DATA, DEMO_MODEL, DEMO_RNP
from rnp_fast.diagnostics import ClassHistogram, predicted_class_histogram
from rnp_fast.loaders.augment import normalisation
from rnp_fast.resolved import resolve_run
from rnp_fast.sweep.spec import load_sweep
from rnp_fast.unlearn import unlearn

TABLE_SWEEP = Path(__file__).with_name("digits_attacks.yaml")  # the training recipe's one home
ATTACKS = ("badnets", "blend", "wanet")
WIDTHS = (0.25, 0.125)


@dataclass(frozen=True)
class ModelSpec:
    """One trained model of the study: its group, attack (None: clean), width, seed and target."""

    attack: str | None
    width: float
    seed: int
    target: int = 0
    label: str | None = None  # a model not trained here (the bundled demo checkpoint)

    @property
    def group(self) -> str:
        return "clean" if self.attack is None else "backdoored"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        kind = "clean" if self.attack is None else f"{self.attack}-t{self.target}"
        return f"{kind}-w{self.width:g}-s{self.seed}"

    def job(self, epochs: int | None = None):
        """The attack table's training job for this model (its first job: every job shares the recipe)."""
        job = table_job()
        attack = replace(
            job.attack,
            attack=self.attack or "badnets",  # clean: the test sets still need some trigger
            poison=self.attack is not None,
            label_mode=None,
            attack_param=[],
            target=self.target,
            poison_seed=self.seed,
            trigger_seed=self.seed,
        )
        return replace(
            job,
            model=replace(job.model, width=self.width),
            data=replace(job.data, seed=self.seed),
            attack=attack,
            train=replace(job.train, epochs=epochs or job.train.epochs),
            engine=replace(job.engine, device="cpu", quiet=True),
        )


@functools.cache
def table_job():
    """The attack table's first job (read once: every model's job is built from it)."""
    return load_sweep(TABLE_SWEEP).jobs[0]


def study_models(per_width: int = 6, per_attack_width: int = 2) -> list[ModelSpec]:
    """Clean: seeds 0..per_width-1 at each width. Backdoored: per attack and width, the next
    ``per_attack_width`` seeds, the target moved with the seed (3 seed + the attack's index, mod 10)
    so that no class is the backdoors' own. Interleaved, so a cut run has a bit of every group."""
    clean = [ModelSpec(None, width, seed) for seed in range(per_width) for width in WIDTHS]
    backdoored = []
    for index, attack in enumerate(ATTACKS):
        for w, width in enumerate(WIDTHS):
            for seed in range(w * per_attack_width, (w + 1) * per_attack_width):
                backdoored.append(ModelSpec(attack, width, seed, (3 * seed + index) % 10))
    backdoored.sort(key=lambda spec: (spec.seed, spec.attack))
    ordered = []
    for i in range(max(len(clean), len(backdoored))):  # b c c b b c ...: each shard gets both groups
        pair = [group[i] for group in (backdoored, clean) if i < len(group)]
        ordered += pair if i % 2 == 0 else pair[::-1]
    return ordered


def shard_flag(text: str) -> tuple[int, int]:
    """``--shard I/N`` as (I, N), with 0 <= I < N (else one line from argparse, exit 2)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"I/N needs 0 <= I < N, got {text!r}")
    return index, count


def shard(items: list, share: tuple[int, int]) -> list:
    """Every N-th item from the I-th of ``share`` (I, N): two processes split the work."""
    index, count = share
    return items[index::count]


def model_dir(work: Path, spec: ModelSpec) -> Path:
    return work / "models" / spec.name


def train_models(specs: list[ModelSpec], work: Path, epochs: int | None = None) -> None:
    """Train every model not trained yet (a run directory is written whole or not at all)."""
    for spec in specs:
        out = model_dir(work, spec)
        if (out / "summary.json").exists():
            continue
        job = spec.job(epochs)
        tick = time.perf_counter()
        summary = training.train_backdoor(str(out), job.model, job.data, job.attack, job.train, job.engine, True)
        took = time.perf_counter() - tick
        figures = f"clean {summary['clean_acc']:.3f} ASR {summary['asr']:.3f}"
        print(f"trained {spec.name}: {figures} ({took:.0f} s)", flush=True)


# -- measuring: every statistic from clean images only ---------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much each model is measured (the study's, or the dry run's: it checks, measures nothing)."""

    unlearning_seeds: tuple[int, ...] = (0, 1, 2)  # defense-data seeds of the unlearning runs
    defense_seeds: tuple[int, ...] = (0, 1)  # purified models per backdoored model (each one of the above)
    rnp: tuple[tuple[str, int], ...] = ()  # RNPConfig fields beyond the demo's
    margin_starts: int = 2  # MM-BD: random starting images per class
    margin_steps: int = 100  # MM-BD: gradient-ascent steps (the classes' order is settled by then)
    train_epochs: int | None = None  # None: the recipe's
    implanted_asr: float = 0.5  # a backdoored model below this ASR did not take the backdoor: left out

    @property
    def rnp_config(self) -> RNPConfig:
        """The demo's RNP settings with this study's changes (``rnp``)."""
        return RNPConfig(**DEMO_RNP, **dict(self.rnp))


STUDY = Settings()
# The bundled demo model (BadNets grid, target 0, 60 epochs with augmentation) is where RNP removes
# the backdoor at all on these settings (docs/efficacy.md): its defense over data seeds 0-9 and over
# seed 0's images in nine more orders gives the purified models whose backdoor is gone.
DEMO = ModelSpec("badnets", 0.25, 0, 0, label="demo")
DEMO_DRAWS = tuple((seed, None) for seed in range(10)) + tuple((0, order) for order in range(1, 10))
DRY_RUN = Settings((0, 1), (0,), (("unlearning_epochs", 1), ("recovering_epochs", 1)), 1, 3, 1, implanted_asr=0.0)


def study_run(spec: ModelSpec):
    """The demo's defense settings for this model (its width, its attack's test sets), one thread."""
    model = replace(DEMO_MODEL, width=spec.width)
    return resolve_run(model, DataConfig(**DEMO_DATA), spec.job().attack, EngineConfig(device="cpu", quiet=True))


def unlearning_trace(model: nn.Module, run, seed: int, rnp: RNPConfig, order: int | None = None):
    """The product's unlearning on defense-data seed ``seed`` (``order``: its order and augmentation
    seed, default ``seed``'s), with the unlearned model's predicted-class histogram on the held-out
    images after every epoch; and the unlearned model."""
    data = defense_data(run.source, replace(run.data, seed=seed))
    images, epochs = data.rule_images, []

    def on_epoch(unlearned: nn.Module, stats) -> None:
        counts = predicted_class_histogram(unlearned, images, run.mean, run.std, run.num_classes).counts
        epochs.append({"epoch": stats.epoch, "loss": stats.loss, "acc": stats.acc, "counts": counts})

    result = unlearn(model, run.defense_loader(data.train, seed if order is None else order), rnp, on_epoch, run.engine)
    counts = predicted_class_histogram(result.model, images, run.mean, run.std, run.num_classes).counts
    trace = {
        "seed": seed,
        "stop_epoch": result.stop_epoch,
        "reached_threshold": result.reached_threshold,
        "diverged_epoch": result.diverged_epoch,
        "counts": counts,
        "epochs": epochs,
    }
    return trace, result.model


def max_margins(model: nn.Module, run, starts: int, steps: int, seed: int = 0) -> list[float]:
    """MM-BD's statistic per class (Wang, Xiang, Miller and Kesidis, IEEE S&P 2024): the largest
    logit margin (own logit minus the largest other) any input image reaches, by gradient ascent
    from ``starts`` random images per class, pixels kept in [0, 1]. Uses no data at all."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    classes = torch.arange(run.num_classes).repeat_interleave(starts)
    shape = run.source.train.images.shape[1:]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((len(classes), *shape), generator=generator).requires_grad_()
    mean, std = (t.view(1, -1, 1, 1) for t in normalisation(run.mean, run.std, "cpu"))
    optimiser = torch.optim.Adam([pixels], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        (-margins_of(model, pixels, classes, mean, std).sum()).backward()
        optimiser.step()
        with torch.no_grad():
            pixels.clamp_(0, 1)
    with torch.no_grad():
        margins = margins_of(model, pixels, classes, mean, std)
    return margins.view(run.num_classes, starts).amax(1).tolist()


def margins_of(model: nn.Module, pixels: torch.Tensor, classes: torch.Tensor, mean, std) -> torch.Tensor:
    logits = model((pixels - mean) / std)
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def runner_up_counts(model: nn.Module, run, seed: int) -> dict:
    """How often each class is the second choice on the held-out clean images, and its mean
    probability on the images of the other classes (a target class can sit just below the top:
    Gao et al., "Energy-based backdoor defense without task-specific samples", ICML 2024)."""
    images = defense_data(run.source, replace(run.data, seed=seed)).rule_images
    probabilities = run.predict(model, images.images).softmax(1)
    second = probabilities.topk(2, dim=1).indices[:, 1]
    others = [probabilities[images.labels != c, c].mean().item() for c in range(run.num_classes)]
    counts = torch.bincount(second, minlength=run.num_classes).tolist()
    return {"second_choice_counts": counts, "mean_prob_others": others}


def model_statistics(model: nn.Module, run, settings: Settings) -> tuple[dict, dict[int, nn.Module]]:
    """Every clean-data statistic of one model, and its unlearned models by seed."""
    rnp = settings.rnp_config
    traces, unlearned = [], {}
    for seed in settings.unlearning_seeds:
        trace, unlearned[seed] = unlearning_trace(model, run, seed, rnp)
        traces.append(trace)
    measured = {
        "unlearning": traces,
        "max_margins": max_margins(model, run, settings.margin_starts, settings.margin_steps),
        **runner_up_counts(model, run, settings.unlearning_seeds[0]),
    }
    return measured, unlearned


def defend(spec: ModelSpec, path: Path, run, backdoored: nn.Module, unlearned: nn.Module, draw, settings):
    """The product's defense (demo settings, defense-data seed and order seed ``draw``) from this
    unlearned model: the same computation as `rnp-fast defend --seed S` (or `rnp-fast demo --repeats
    --repeat-over order`'s draw), its unlearning being ``unlearned``."""
    seed, order = draw
    job = DefendJob(
        model_path=str(path),
        out=None,
        model=run.model,
        data=replace(run.data, seed=seed),
        attack=run.attack,  # the model's own (study_run resolved it from spec.job())
        rnp=settings.rnp_config,
        engine=run.engine_config,
    )
    return compute_defense(job, run, Inputs(backdoored, unlearned), seed=seed, order_seed=order)


def purified_record(spec: ModelSpec, path: Path, run, model, measured: dict, unlearned: dict, draw, settings) -> dict:
    """One defense draw's purified model: its ASR and clean accuracy after, and its statistics."""
    seed, order = draw
    if order in (None, seed) and seed in unlearned:
        start = unlearned[seed]  # the defense's own unlearning: measured already
    else:
        start = unlearning_trace(model, run, seed, settings.rnp_config, order)[1]
    defense = defend(spec, path, run, model, start, draw, settings)
    after, chosen = defense.pruning.after, defense.pruning.chosen
    pruned = chosen.count if chosen else 0
    # nothing pruned: the purified model is the backdoored one, and so are its statistics
    purified_measured = model_statistics(defense.purified, run, settings)[0] if pruned else measured
    suffix = f"o{order}" if order not in (None, seed) else ""
    return {
        "name": f"{spec.name}-d{seed}{suffix}",
        "defense_seed": seed,
        "order_seed": order,
        "asr_after": after.asr,
        "clean_acc_after": after.clean_acc_full,
        "pruned": pruned,
        **purified_measured,
    }


def measure_model(spec: ModelSpec, work: Path, settings: Settings, path: Path | None = None, draws=None) -> dict:
    """One model's record: its clean accuracy, ASR and statistics; for a backdoored model, each
    defense draw's purified model (default: the settings' defense seeds) with its measured ASR and
    its own statistics. ``path``: a checkpoint not trained here (figures measured, not read)."""
    tick = time.perf_counter()
    run = study_run(spec)
    if path is None:
        path = model_dir(work, spec) / "model.safetensors"
        trained = json.loads((model_dir(work, spec) / "summary.json").read_text())
    else:
        metrics = run.evaluator()(run.load_model(str(path)))
        trained = {"clean_acc": metrics.clean_acc_full, "asr": metrics.asr}
    model = run.load_model(str(path))
    measured, unlearned = model_statistics(model, run, settings)
    record = {
        "name": spec.name,
        "group": spec.group,
        "attack": spec.attack,
        "width": spec.width,
        "seed": spec.seed,
        "target": spec.target if spec.attack else None,
        "clean_acc": trained["clean_acc"],
        "asr": trained["asr"],
        **measured,
        "purified": [],
    }
    if spec.attack is not None:
        for draw in draws or [(seed, None) for seed in settings.defense_seeds]:
            record["purified"].append(purified_record(spec, path, run, model, measured, unlearned, draw, settings))
    record["seconds"] = time.perf_counter() - tick
    record["load_average"] = os.getloadavg()
    return record


# -- from a record to candidate statistics ----------------------------------------------------------
# Each statistic is oriented before the study (larger = "backdoor present") so that its AUC is not
# picked after the fact: a statistic that points the other way shows an AUC below 0.5.


def share_and_entropy(counts: list[int]) -> tuple[int, float, float]:
    """The collapse class and its share (the product's `ClassHistogram`), and the entropy of the counts."""
    histogram = ClassHistogram(counts)
    entropy = -sum(c / histogram.total * math.log(c / histogram.total) for c in counts if c > 0)
    return histogram.top_class, histogram.top_share, entropy


def anomaly_index(values: list[float]) -> float:
    """How far the largest value sits above the others' median, in robust standard deviations
    (1.4826 x the median absolute deviation): Neural Cleanse's anomaly index, for the largest."""
    top = max(values)
    rest = sorted(values)[:-1]
    median = statistics.median(rest)
    spread = 1.4826 * statistics.median(abs(v - median) for v in rest)
    return (top - median) / max(spread, 1e-12)


def mmbd_score(margins: list[float]) -> float:
    """MM-BD's detection statistic as -log10 of its p-value: the largest class margin against a
    Gamma null fitted to the others, as the largest of K-1 draws (p = 1 - F(max)^(K-1))."""
    from scipy import stats as scipy_stats

    ordered = sorted(margins)
    rest, top = ordered[:-1], ordered[-1]
    # a class no input lifts above the others has a margin <= 0: the null then starts below it
    floor = min(0.0, rest[0]) - 1e-6 * (1.0 + abs(rest[0]))
    shape, loc, scale = scipy_stats.gamma.fit(rest, floc=floor)
    log_cdf = scipy_stats.gamma.logcdf(top, shape, loc, scale)
    p = -math.expm1(len(rest) * log_cdf)  # 1 - F^(K-1), accurate near 0
    return min(-math.log10(max(p, 1e-300)), 300.0)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda c: values[c])


def features(stats: dict) -> dict:
    """The candidate statistics of one model's measurements (`model_statistics`)."""
    traces = stats["unlearning"]
    finals = [share_and_entropy(t["counts"]) for t in traces]
    firsts = [share_and_entropy(t["epochs"][0]["counts"]) for t in traces if t["epochs"]]
    tops = [top for top, _, _ in finals]
    mode = max(set(tops), key=tops.count)
    margins = stats["max_margins"]
    return {
        "collapse_class": mode,
        "margin_class": argmax(margins),
        "runner_up_class": argmax(stats["second_choice_counts"]),
        "prob_others_class": argmax(stats["mean_prob_others"]),
        "top_share": statistics.mean(share for _, share, _ in finals),
        "neg_entropy": -statistics.mean(entropy for _, _, entropy in finals),
        "first_epoch_top_share": statistics.mean(share for _, share, _ in firsts) if firsts else float("nan"),
        "neg_stop_epoch": -statistics.mean(t["stop_epoch"] for t in traces),
        "first_epoch_loss": statistics.mean(t["epochs"][0]["loss"] for t in traces if t["epochs"]),
        "collapse_agreement": tops.count(mode) / len(tops),
        "first_seed_agreement": sum(top == tops[0] for top in tops[1:]) / max(len(tops) - 1, 1),
        "mmbd": mmbd_score(margins),
        "margin_anomaly": anomaly_index(margins),
        "runner_up_anomaly": anomaly_index(stats["second_choice_counts"]),
        "prob_others_anomaly": anomaly_index(stats["mean_prob_others"]),
    }


CANDIDATES = (
    "top_share",
    "neg_entropy",
    "first_epoch_top_share",
    "neg_stop_epoch",
    "first_epoch_loss",
    "collapse_agreement",
    "first_seed_agreement",
    "mmbd",
    "margin_anomaly",
    "runner_up_anomaly",
    "prob_others_anomaly",
)
PURIFIED_ONLY = ("same_collapse_as_original",)


def purified_features(purified: dict, original: dict) -> dict:
    """A purified model's statistics, and whether its collapse class (per unlearning seed) is the
    original model's (the share of seeds where it is)."""
    mine = [share_and_entropy(t["counts"])[0] for t in purified["unlearning"]]
    theirs = [share_and_entropy(t["counts"])[0] for t in original["unlearning"]]
    same = sum(a == b for a, b in zip(mine, theirs, strict=True)) / len(mine)
    return {**features(purified), "same_collapse_as_original": same}


# -- discrimination: ROC AUC, its bootstrap interval, TPR at a low FPR ----------------------------


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney form of the AUC)."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def bootstrap_auc(positives: list[float], negatives: list[float], draws: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the AUC, resampling models within each group (both groups keep
    their sizes)."""
    if not positives or not negatives:
        return [float("nan"), float("nan")]
    generator = random.Random(seed)
    values = sorted(
        roc_auc(generator.choices(positives, k=len(positives)), generator.choices(negatives, k=len(negatives)))
        for _ in range(draws)
    )
    return [values[int(0.025 * draws)], values[min(int(0.975 * draws), draws - 1)]]


def tpr_at_fpr(positives: list[float], negatives: list[float], max_fpr: float = 0.1) -> float:
    """The largest share of positives flagged by a threshold ``score >= t`` that flags at most
    ``max_fpr`` of the negatives (chosen on these very models: optimistic for new ones)."""
    if not positives or not negatives:
        return float("nan")
    best = 0.0
    for threshold in sorted(set(positives) | set(negatives)):
        fpr = sum(n >= threshold for n in negatives) / len(negatives)
        if fpr <= max_fpr + 1e-12:
            best = max(best, sum(p >= threshold for p in positives) / len(positives))
    return best


def discrimination(positives: list[float], negatives: list[float]) -> dict:
    if not positives or not negatives:
        return {"auc": None, "note": "a group is empty"}
    finite = [v for v in (*positives, *negatives) if not math.isnan(v)]
    if len(finite) < len(positives) + len(negatives):
        return {"auc": None, "note": "undefined on some model"}
    interval = bootstrap_auc(positives, negatives)
    auc, tpr = roc_auc(positives, negatives), tpr_at_fpr(positives, negatives)
    return {"auc": auc, "auc_95": interval, "tpr_at_fpr_0.1": tpr, "n": [len(positives), len(negatives)]}


MIN_GROUP = 10  # fewer models on a side: a perfect split of a few makes a bootstrap interval of [1, 1]


def passes(result: dict) -> bool:
    """The issue's bar for shipping: AUC >= 0.9 and the interval's lower end >= 0.8, with at least
    ``MIN_GROUP`` models on each side."""
    if result.get("auc") is None or min(result["n"]) < MIN_GROUP:
        return False
    return result["auc"] >= 0.9 and result["auc_95"][0] >= 0.8


# -- the report -------------------------------------------------------------------------------------

REMOVED = 0.1  # purified and removed: ASR after <= this (the efficacy study's success criterion)


def read_records(work: Path) -> list[dict]:
    records = {}
    for path in sorted(work.glob("records*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["name"]] = record
    return list(records.values())


def model_entry(record: dict, figures: dict) -> dict:
    """One model's row in the saved result: what it is, its statistics, and the raw measurements
    behind them (histograms per epoch, margins), so that a new statistic needs no rerun."""
    keep = ("name", "attack", "width", "seed", "target", "clean_acc", "asr", "asr_after", "clean_acc_after")
    keep += ("pruned", "defense_seed", "parent")
    return {
        **{k: record[k] for k in keep if k in record},
        "statistics": figures,
        "collapse_classes": [share_and_entropy(t["counts"])[0] for t in record["unlearning"]],
        "stop_epochs": [t["stop_epoch"] for t in record["unlearning"]],
        "raw": {k: record[k] for k in ("unlearning", "max_margins", "second_choice_counts", "mean_prob_others")},
    }


def build_groups(records: list[dict], implanted: float) -> dict:
    clean = [model_entry(r, features(r)) for r in records if r["group"] == "clean"]
    backdoored, not_implanted, purified = [], [], []
    for record in records:
        if record["group"] != "backdoored":
            continue
        (backdoored if record["asr"] >= implanted else not_implanted).append(model_entry(record, features(record)))
        if record["asr"] < implanted:
            continue
        for child in record["purified"]:
            entry = {**child, "parent": record["name"], "attack": record["attack"], "target": record["target"]}
            entry["width"], entry["seed"] = record["width"], record["seed"]
            figures = purified_features(child, record)
            purified.append({**model_entry(entry, figures), "removed": child["asr_after"] <= REMOVED})
    return {
        "clean": {"n": len(clean), "models": clean},
        "backdoored": {"n": len(backdoored), "models": backdoored, "not_implanted": not_implanted},
        "purified": {
            "n": len(purified),
            "removed": sum(m["removed"] for m in purified),
            "still_backdoored": sum(not m["removed"] for m in purified),
            "nothing_pruned": sum(not m["pruned"] for m in purified),
            "models": purified,
        },
    }


def question(positives: list[dict], negatives: list[dict], names) -> dict:
    return {
        name: discrimination([m["statistics"][name] for m in positives], [m["statistics"][name] for m in negatives])
        for name in names
    }


def target_agreement(models: list[dict]) -> dict:
    """How often the collapse class (and MM-BD's largest-margin class) is the attack's target."""
    if not models:
        return {"n": 0}
    n = len(models)
    per_seed = [c == m["target"] for m in models for c in m["collapse_classes"]]
    return {
        "n": n,
        "collapse_class_is_target": sum(m["statistics"]["collapse_class"] == m["target"] for m in models) / n,
        "collapse_class_is_target_per_unlearning_run": sum(per_seed) / len(per_seed),
        **{
            f"{kind}_is_target": sum(m["statistics"][kind] == m["target"] for m in models) / n
            for kind in ("margin_class", "runner_up_class", "prob_others_class")
        },
    }


def analyse(groups: dict) -> dict:
    clean, backdoored = groups["clean"]["models"], groups["backdoored"]["models"]
    purified = groups["purified"]["models"]
    still = [m for m in purified if not m["removed"]]
    removed = [m for m in purified if m["removed"]]
    pruned_still = [m for m in still if m["pruned"]]  # an unpruned "purified" model is the backdoored one
    demo = [m for m in purified if m["parent"] == DEMO.name]  # one model: no model-to-model confound
    demo_still, demo_removed = [m for m in demo if not m["removed"]], [m for m in demo if m["removed"]]
    questions = {
        "backdoored_vs_clean": question(backdoored, clean, CANDIDATES),
        "purified_still_backdoored_vs_removed": question(still, removed, CANDIDATES + PURIFIED_ONLY),
        "purified_pruned_still_backdoored_vs_removed": question(pruned_still, removed, CANDIDATES + PURIFIED_ONLY),
        "demo_purified_still_backdoored_vs_removed": question(demo_still, demo_removed, CANDIDATES + PURIFIED_ONLY),
    }
    passing = {q: [name for name, result in figures.items() if passes(result)] for q, figures in questions.items()}
    agreement = {
        "backdoored": target_agreement(backdoored),
        "purified_still_backdoored": target_agreement(still),
        "purified_removed": target_agreement(removed),
        "clean_collapse_classes": [m["statistics"]["collapse_class"] for m in clean],
    }
    return {"questions": questions, "passing": passing, "target_agreement": agreement}


def machine_state(records: list[dict]) -> dict:
    loads = [r["load_average"][0] for r in records if "load_average" in r]
    return {
        "threads_per_process": torch.get_num_threads(),
        "processes": "two study processes (--shard 0/2 and 1/2), one thread each",
        "idle": False,
        "note": "the 2 cores were shared with other sessions' work; AUCs do not depend on load (CPU runs "
        "are deterministic at one thread), only the seconds do",
        "load_average_1min_at_each_model": {"min": min(loads), "max": max(loads)} if loads else None,
        "measure_seconds_total": sum(r["seconds"] for r in records),
    }


def summary_lines(analysis: dict, groups: dict) -> list[str]:
    lines = [
        f"clean {groups['clean']['n']}, backdoored {groups['backdoored']['n']}, purified {groups['purified']['n']} "
        f"({groups['purified']['removed']} removed, {groups['purified']['still_backdoored']} still backdoored)"
    ]
    for q, figures in analysis["questions"].items():
        for name, r in figures.items():
            if r.get("auc") is not None:
                low, high = r["auc_95"]
                figures = f"AUC {r['auc']:.2f} [{low:.2f}, {high:.2f}] TPR@FPR<=0.1 {r['tpr_at_fpr_0.1']:.2f}"
                lines.append(f"{q:38s} {name:26s} {figures}")
    return lines


def markdown_table(result: dict) -> str:
    """The AUC table docs/efficacy.md quotes: one row per statistic, one column per question."""
    questions = list(result["questions"])
    lines = ["| statistic | " + " | ".join(questions) + " |", "|---" * (len(questions) + 1) + "|"]
    for name in dict.fromkeys(n for figures in result["questions"].values() for n in figures):
        cells = []
        for q in questions:
            r = result["questions"][q].get(name)
            if r is None or r.get("auc") is None:
                cells.append("-")
            else:
                low, high = r["auc_95"]
                cells.append(f"{r['auc']:.2f} [{low:.2f}, {high:.2f}]; {r['tpr_at_fpr_0.1']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sizes = ", ".join(
        f"{q}: {' vs '.join(map(str, next(iter(result['questions'][q].values())).get('n', [])))}" for q in questions
    )
    return "\n".join(lines) + f"\n\nCells: AUC [95 % bootstrap interval]; TPR at FPR <= 0.1. Models a side: {sizes}.\n"


def report(work: Path, out: str | None, settings: Settings, markdown: str | None = None) -> dict:
    records = read_records(work)
    groups = build_groups(records, settings.implanted_asr)
    analysis = analyse(groups)
    shipped = any(analysis["passing"].values())
    result = {
        "setup": {
            "training": "digits_attacks.yaml's recipe (ResNet-18, 20 epochs, batch 32, lr 0.05, no augmentation)",
            "defense": {"data": DEMO_DATA, "rnp": {**DEMO_RNP, **dict(settings.rnp)}},
            "settings": {k: getattr(settings, k) for k in Settings.__dataclass_fields__},
            "demo_draws": [{"seed": seed, "order_seed": order} for seed, order in DEMO_DRAWS],
            "removed_asr": REMOVED,
            "orientation": "every statistic is oriented so that larger = backdoor present, fixed before the study",
            "commands": REGENERATE,
        },
        "machine": machine_state(records),
        "groups": groups,
        **analysis,
        "ship_rule": f"AUC >= 0.9 with the bootstrap interval's lower end >= 0.8 and >= {MIN_GROUP} models a side",
        "shipped": shipped,
    }
    for line in summary_lines(analysis, groups):
        print(line)
    harness.write_result(result, out, "cpu")
    if markdown:
        Path(markdown).write_text(markdown_table(result))
    return result


REGENERATE = [
    "OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py train --work W --shard 0/2  (and --shard 1/2 at once)",
    "OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py measure --work W --shard 0/2  (and --shard 1/2)",
    "OMP_NUM_THREADS=1 python benchmarks/clean_verdict_study.py demo --work W",
    "python benchmarks/clean_verdict_study.py report --work W --out benchmarks/results/clean_verdict_digits_cpu.json",
]

# -- the phases -------------------------------------------------------------------------------------


def measure_models(specs: list[ModelSpec], work: Path, settings: Settings, records: Path) -> None:
    """Measure every model of ``specs`` not in ``records`` yet, appending one line per model."""
    done = {r["name"] for r in read_records(work)}
    for spec in specs:
        if spec.name in done:
            continue
        record = measure_model(spec, work, settings)
        with open(records, "a") as log:
            log.write(json.dumps(record) + "\n")
        removed = [f"{p['asr_after']:.2f}" for p in record["purified"]]
        print(f"measured {spec.name} ({record['seconds']:.0f} s) purified ASR {removed}", flush=True)


def dry_run_models() -> list[ModelSpec]:
    return [ModelSpec(None, 0.125, 0), ModelSpec("badnets", 0.125, 0, 3)]


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("phase", choices=("train", "measure", "demo", "report", "dry-run"))
    parser.add_argument("--work", required=True, help="models and records live here (resumable)")
    parser.add_argument(
        "--shard", type=shard_flag, default=(0, 1), help="I/N: this process's share of the models (train, measure)"
    )
    parser.add_argument("--markdown", help="report: also write the AUC table as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process: deterministic figures, two processes on two cores
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dry = args.phase == "dry-run"
    settings, specs = (DRY_RUN, dry_run_models()) if dry else (STUDY, study_models())
    if args.phase in ("train", "dry-run"):
        train_models(shard(specs, args.shard), work, settings.train_epochs)
    if args.phase in ("measure", "dry-run"):
        measure_models(shard(specs, args.shard), work, settings, work / f"records{args.shard[0]}.jsonl")
    if args.phase == "demo" and DEMO.name not in {r["name"] for r in read_records(work)}:
        from rnp_fast.demo import demo_checkpoint

        record = measure_model(DEMO, work, settings, Path(demo_checkpoint()), DEMO_DRAWS)
        with open(work / "records_demo.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
    if args.phase in ("report", "dry-run"):
        report(work, args.out, settings, args.markdown)


if __name__ == "__main__":
    harness.run(main)
