"""Clean-data-only robustifications of RNP, measured over defense seeds and models.

For every model and defense-data seed, one unlearning and one recovering run (the product's own
`unlearn` and `recover`, demo settings) give the masks; the variants below reuse them and differ
only in ranking or threshold rule, except ``weighted_recover`` (one more recovering run):

- ``paper``: masks ascending, the held-out rule (accuracy within 2 points of unpruned): RNP as shipped.
- ``nontarget_rule``: the same ranking; the rule scores only the held-out images outside the
  collapse class (the unlearned model's top predicted class, `rnp_fast.diagnostics`).
- ``protect``: the mask ranking without the channels the collapse class needs most on its
  clean defense images (first-order effect of pruning a channel on the class's own logit,
  gamma * d logit / d gamma, top ``--protect`` share never pruned); paper rule.
- ``protect_nontarget``: both of the above.
- ``trajectory``: channels ranked by their mask averaged over the recovering epochs (area under
  the mask trajectory) instead of the last epoch's mask; paper rule.
- ``weighted_recover``: recovering with the collapse class's clean images repeated
  ``--target-weight`` times in the defense data; paper rule.
- ``clp``: Channel Lipschitzness-based Pruning (Zheng et al., "Data-free backdoor removal based on
  channel Lipschitzness", ECCV 2022): channels ranked by their per-layer standardised upper bound
  of the channel Lipschitz constant, pruned above u for u = 6, 5.75, ..., 1; paper rule. Uses no
  data at all for the ranking (a literature baseline, not an RNP variant).

Success = ASR <= 0.1 at a full-test clean drop <= 2 points. Every candidate of the schedule is
scored on the test sets until the held-out accuracy has fallen 10 points (further steps cannot
meet the clean criterion), so "oracle" says whether any threshold reached would have succeeded.

    python benchmarks/robustness_study.py --model demo=bundled --model badnets_s1=DIR --seeds 10 \\
        --out /tmp/study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rnp_fast import harness
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, RNPConfig
from rnp_fast.data import defense_data
from rnp_fast.demo import DEMO_DATA, DEMO_MODEL, DEMO_RNP, demo_checkpoint
from rnp_fast.diagnostics import predicted_class_histogram
from rnp_fast.evaluation.intervals import wilson
from rnp_fast.evaluation.metrics import Outputs, metrics_from_outputs, per_class_accuracy
from rnp_fast.evaluation.scoring import batched_test_logits, prune_set, step_scores
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d, masked_batchnorm_layers
from rnp_fast.prune import Channel, PruneStep, lowest_step, rank_channels, threshold_schedule
from rnp_fast.recover import recover
from rnp_fast.repeats import rate
from rnp_fast.resolved import resolve_run
from rnp_fast.select import choose_step
from rnp_fast.unlearn import unlearn

ASR_GOAL, CLEAN_DROP_GOAL = 0.1, 0.02
QUICK = {"unlearning_epochs": 1, "recovering_epochs": 2}  # --quick: a smoke run, not a result
HOPELESS_DROP = 0.10  # held-out accuracy this far below unpruned: later steps are not scored on the test sets
VARIANTS = (
    "paper",
    "nontarget_rule",
    "protect",
    "protect_nontarget",
    "trajectory",
    "weighted_recover",
    "clp",
)


@dataclass
class Pair:
    """One model and one defense seed, with everything the variants share."""

    name: str
    seed: int
    run: object
    backdoored: nn.Module
    data: object
    target: int  # the collapse class (the unlearned model's histogram's top class)


def model_setup(name: str, spec: str) -> tuple[str, AttackConfig]:
    """``bundled`` -> the demo checkpoint; DIR -> a train-backdoor run directory (its summary.json)."""
    if spec == "bundled":
        return demo_checkpoint(), AttackConfig(attack="badnets", label_mode="all2one", target=0)
    attack = json.loads((Path(spec) / "summary.json").read_text())["AttackConfig"]
    fields = {k: attack[k] for k in ("attack", "label_mode", "target", "trigger_seed", "attack_param") if k in attack}
    return str(Path(spec) / "model.safetensors"), AttackConfig(**fields)


# -- rankings ---------------------------------------------------------------------------------------


def channels_from(values: dict[str, torch.Tensor]) -> list[Channel]:
    return [Channel(layer, i, v) for layer, tensor in values.items() for i, v in enumerate(tensor.tolist())]


def mask_snapshot(masked: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.neuron_mask.detach().float().cpu().clone() for name, layer in masked_batchnorm_layers(masked)}


def target_needs(model: nn.Module, images: ImageSet, target: int, mean, std) -> dict[str, torch.Tensor]:
    """Per channel, gamma * d(target logit)/d(gamma) summed over the target class's clean images:
    the first-order loss of target logit if the channel were pruned (positive = the class needs it)."""
    model = model.eval()
    members = images.images[images.labels == target]
    if not len(members):
        return {n: torch.zeros(m.num_features) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    x = (members.float() / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    model.zero_grad()
    model(x)[:, target].sum().backward()
    needs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            needs[name] = (module.weight.detach() * module.weight.grad).cpu()
    model.zero_grad()
    return needs


def protected_ranking(ranked: list[Channel], needs: dict[str, torch.Tensor], share: float) -> list[Channel]:
    scores = sorted(((v.item(), layer, i) for layer, t in needs.items() for i, v in enumerate(t)), reverse=True)
    keep = {(layer, i) for _, layer, i in scores[: round(share * len(scores))]}
    return [c for c in ranked if (c.layer, c.index) not in keep]


def clp_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per BatchNorm channel, the per-layer z-score of its upper bound of channel Lipschitzness:
    the spectral norm of the channel's conv kernel scaled by |gamma| / sqrt(var + eps) (Zheng et al.)."""
    scores, conv = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d) and conv is not None:
            scale = module.weight.detach().abs() / torch.sqrt(module.running_var + module.eps)
            kernels = conv.weight.detach().flatten(2) * scale.view(-1, 1, 1)  # [out, in, kh*kw]
            bound = torch.linalg.matrix_norm(kernels, ord=2)
            scores[name] = ((bound - bound.mean()) / bound.std().clamp_min(1e-12)).cpu()
    return scores


def clp_steps(scores: dict[str, torch.Tensor]) -> list[PruneStep]:
    """Prune every channel whose z-score exceeds u, for u = 6 down to 1 (cumulative, like thresholds)."""
    ranked = sorted(channels_from(scores), key=lambda c: -c.value)
    levels = [6.0 - 0.25 * i for i in range(21)]
    return [lowest_step(ranked, u, sum(c.value > u for c in ranked)) for u in levels]


# -- scoring one variant ----------------------------------------------------------------------------


class CandidateCache:
    """Every distinct prune set of all variants scored once: held-out logits for the rules, then
    test logits for the steps some variant can still use (one batched pass each)."""

    def __init__(self, pair: Pair, schedules: dict[str, tuple[list[PruneStep], int | None]], options):
        self.pair, self.options = pair, options
        unique = {}
        for steps, _ in schedules.values():
            for step in steps:
                unique.setdefault(prune_set(step), step)
        self.steps = unique
        holdout = pair.data.rule_images
        steps, identity = list(unique.values()), lambda logits: logits
        logits = step_scores(pair.backdoored, steps, holdout, *self.normalisation(), options, identity)
        self.labels = holdout.labels.to(logits[0].device)
        self.base_holdout = logits[0]
        self.holdout = dict(zip(unique, logits[1:], strict=True))
        self.rows: dict = {}
        self.before: dict | None = None

    def normalisation(self):
        return self.pair.run.source.mean, self.pair.run.source.std

    def holdout_accuracy(self, logits: torch.Tensor, exclude: int | None) -> float:
        keep = self.labels != exclude if exclude is not None else torch.ones_like(self.labels, dtype=torch.bool)
        return (logits.argmax(1)[keep] == self.labels[keep]).float().mean().item()

    def score_tests(self, keys: list) -> None:
        tests = self.pair.run.tests
        steps = [lowest_step([], 0.0, 0), *(self.steps[key] for key in keys)]
        logits = batched_test_logits(self.pair.backdoored, steps, tests, self.options)
        rows = [step_row(self.pair, Outputs(*pair_logits), tests) for pair_logits in logits]
        self.before = rows[0]
        self.rows = dict(zip(keys, rows[1:], strict=True))


def rule_choice(cache: CandidateCache, steps: list[PruneStep], exclude: int | None):
    """The paper's rule on this variant's held-out accuracies, and the steps worth test scoring."""
    base = cache.holdout_accuracy(cache.base_holdout, exclude)
    accs = [cache.holdout_accuracy(cache.holdout[prune_set(step)], exclude) for step in steps]
    choice = choose_step(accs, base, 0.02, [s.label for s in steps])
    reach = next((i for i, a in enumerate(accs) if a < base - HOPELESS_DROP), len(steps))
    return choice, steps[: max(reach, (choice.index or 0) + 1)]


def evaluate_variants(pair: Pair, schedules: dict[str, tuple[list[PruneStep], int | None]], options) -> dict:
    cache = CandidateCache(pair, schedules, options)
    choices = {name: rule_choice(cache, steps, exclude) for name, (steps, exclude) in schedules.items()}
    needed = dict.fromkeys(prune_set(step) for _, scored in choices.values() for step in scored)
    cache.score_tests(list(needed))
    return {name: variant_outcome(cache, choice, scored) for name, (choice, scored) in choices.items()}


def variant_outcome(cache: CandidateCache, choice, scored: list[PruneStep]) -> dict:
    before = cache.before
    curve = []
    for step in scored:
        row = {**cache.rows[prune_set(step)], "label": step.label, "pruned": step.count}
        row["success"] = success(before, row)
        curve.append(row)
    after = curve[choice.index] if choice.index is not None else {**before, "label": None, "pruned": 0}
    return {
        "before": before,
        "after": {**after, "success": success(before, after)},
        "chosen_index": choice.index,
        "oracle": any(row["success"] for row in curve),
        "curve": curve,
    }


def step_row(pair: Pair, outputs: Outputs, tests) -> dict:
    metrics = metrics_from_outputs(outputs, tests)
    per_class = per_class_accuracy(outputs.clean_logits, tests.clean.labels, pair.run.num_classes)
    return {
        "asr": metrics.asr,
        "clean_nontarget": metrics.clean_acc,
        "clean_full": metrics.clean_acc_full,
        "target_class_acc": per_class[pair.run.attack.target],
    }


def success(before: dict, after: dict) -> bool:
    return after["asr"] <= ASR_GOAL and before["clean_full"] - after["clean_full"] <= CLEAN_DROP_GOAL + 1e-9


# -- one model, one seed ----------------------------------------------------------------------------


def weighted_images(images: ImageSet, target: int, weight: int) -> ImageSet:
    extra = torch.nonzero(images.labels == target).flatten().repeat(weight - 1)
    order = torch.cat([torch.arange(len(images)), extra])
    return images.subset(order)


def learn(run, unlearned: nn.Module, images: ImageSet, rnp: RNPConfig, record: bool):
    """Recover masks on ``images``; with ``record``, also the masks' mean over the epochs."""
    loader = run.defense_loader(images)
    snapshots = []
    on_epoch = (lambda model, stats: snapshots.append(mask_snapshot(model))) if record else None
    result = recover(run.new_model(MaskedBatchNorm2d), unlearned, loader, rnp, on_epoch, run.engine)
    mean_masks = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0]} if record else None
    return result.channels, mean_masks


def study_pair(name: str, path: str, attack: AttackConfig, seed: int, source, tests, args) -> dict:
    tick = time.perf_counter()
    data_config = DataConfig(**DEMO_DATA, seed=seed)
    engine = EngineConfig(device="cpu", quiet=True)
    run = resolve_run(DEMO_MODEL, data_config, attack, engine, source=source, tests=tests)
    rnp = RNPConfig(**DEMO_RNP, **(QUICK if args.quick else {}))
    backdoored = run.load_model(path)
    data = defense_data(run.source, data_config)
    unlearned = unlearn(backdoored, run.defense_loader(data.train), rnp, None, run.engine).model
    histogram = predicted_class_histogram(unlearned, data.rule_images, source.mean, source.std, run.num_classes)
    pair = Pair(name, seed, run, backdoored, data, histogram.top_class)
    channels, mean_masks = learn(run, unlearned, data.train, rnp, record=True)
    if args.weighted:
        weighted_data = weighted_images(data.train, pair.target, args.target_weight)
        weighted = learn(run, unlearned, weighted_data, rnp, False)[0]
    needs = target_needs(run.load_model(path).cpu(), data.train, pair.target, source.mean, source.std)
    options = run.scoring()
    ranked = rank_channels(channels)
    protected = protected_ranking(ranked, needs, args.protect)
    schedules = {
        "paper": (ranked, None),
        "nontarget_rule": (ranked, pair.target),
        "protect": (protected, None),
        "protect_nontarget": (protected, pair.target),
        "trajectory": (rank_channels(channels_from(mean_masks)), None),
    }
    if args.weighted:
        schedules["weighted_recover"] = (rank_channels(weighted), None)
    steps = {name: (threshold_schedule(ranking, 0.9, 0.05), exclude) for name, (ranking, exclude) in schedules.items()}
    steps["clp"] = (clp_steps(clp_scores(backdoored)), None)
    results = evaluate_variants(pair, steps, options)
    return {
        "model": name,
        "seed": seed,
        "histogram": histogram.as_dict(),
        "target_detected": histogram.top_class == attack.target,
        "masks": [c.value for c in channels] if args.keep_masks else None,
        "variants": results,
        "seconds": time.perf_counter() - tick,
    }


# -- the table --------------------------------------------------------------------------------------


def table(records: list[dict]) -> list[dict]:
    """Per model and variant: success rate (full-test and non-target clean), oracle rate, means."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        for variant in VARIANTS:
            outcomes = [r["variants"][variant] for r in mine if variant in r["variants"]]
            if outcomes:
                rows.append(summary_row(model, variant, outcomes))
    return rows


def summary_row(model: str, variant: str, outcomes: list[dict]) -> dict:
    afters = [o["after"] for o in outcomes]
    drops = [o["before"]["clean_full"] - a["clean_full"] for o, a in zip(outcomes, afters, strict=True)]
    nontarget_ok = [
        a["asr"] <= ASR_GOAL and o["before"]["clean_nontarget"] - a["clean_nontarget"] <= CLEAN_DROP_GOAL + 1e-9
        for o, a in zip(outcomes, afters, strict=True)
    ]
    success = rate([a["success"] for a in afters])
    return {
        "model": model,
        "variant": variant,
        "seeds": len(outcomes),
        "success_rate": success["rate"],
        "success_rate_se": success["std_error"],  # kept for older readers; 0 at 0 %
        "success_rate_nontarget_clean": sum(nontarget_ok) / len(afters),
        "oracle_rate": sum(o["oracle"] for o in outcomes) / len(outcomes),
        "asr_after_median": statistics.median(a["asr"] for a in afters),
        "clean_full_drop_median": statistics.median(drops),
        "target_class_acc_median": statistics.median(a["target_class_acc"] for a in afters),
    }


def write_csv(rows: list[dict], path: Path) -> None:
    header = list(rows[0])
    lines = [",".join(header)]
    lines += [",".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", help="save the result as JSON here")
    parser.add_argument("--model", action="append", help="NAME=bundled or NAME=TRAIN_RUN_DIR")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--protect", type=float, default=0.05, help="share of channels protected (protect)")
    parser.add_argument("--weighted", action="store_true", help="also run weighted_recover (one more recovery)")
    parser.add_argument("--target-weight", type=int, default=3, help="repeats of target images (weighted_recover)")
    parser.add_argument("--keep-masks", action="store_true", help="store every seed's masks in the JSON")
    parser.add_argument("--quick", action="store_true", help="2 epochs per stage: checks the script, measures nothing")
    parser.add_argument("--log", help="JSON lines file: one record per finished seed (kept if the run stops)")
    parser.add_argument("--from-log", help="no runs: the table of the records in this JSON lines file")
    parser.add_argument("--csv", help="also write the table as CSV here")
    parser.add_argument("--markdown", help="also write the table as Markdown here")
    args = parser.parse_args()
    if not args.from_log and not args.model:
        parser.error("name at least one --model (NAME=bundled or NAME=TRAIN_RUN_DIR), or give --from-log")
    torch.set_num_threads(1)
    if args.from_log:
        records = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.strip()]
        device = "cpu"
    else:
        records, device = collect(args)
    report(records, args, device)


def collect(args) -> tuple[list[dict], torch.device]:
    records, models = [], []
    for spec in args.model:
        name, _, where = spec.partition("=")
        path, attack = model_setup(name, where)
        first = resolve_run(DEMO_MODEL, DataConfig(**DEMO_DATA), attack, EngineConfig(device="cpu"))
        models.append((name, path, attack, first.tests))
    for seed in range(args.first_seed, args.first_seed + args.seeds):  # seeds outside: a cut run stays balanced
        for name, path, attack, tests in models:
            record = study_pair(name, path, attack, seed, first.source, tests, args)
            records.append(record)
            print(one_line(record), flush=True)
            if args.log:
                with open(args.log, "a") as log:
                    log.write(json.dumps(record) + "\n")
    return records, first.device


def report(records: list[dict], args, device) -> None:
    rows = table(records)
    for row in rows:
        print(json.dumps(row))
    if args.csv:
        write_csv(rows, Path(args.csv))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows))
    setup = {"data": DEMO_DATA, "rnp": DEMO_RNP, "protect": args.protect, "target_weight": args.target_weight}
    setup.update(asr_goal=ASR_GOAL, clean_drop_goal=CLEAN_DROP_GOAL, models=sorted({r["model"] for r in records}))
    setup["seeds"] = sorted({r["seed"] for r in records})
    harness.write_result({"setup": setup, "table": rows, "records": records}, args.out, device)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | variant | seeds | success (full-test clean) [95 % interval] | success (non-target clean) "
        "| any threshold | median ASR after | median clean drop (points) | median target-class acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [table_row(r) for r in rows]) + "\n"


def table_row(r: dict) -> str:
    """One model and variant: its rates over seeds with their 95 % Wilson intervals, then medians."""
    seeds = int(r["seeds"])
    return (
        f"| {r['model']} | {r['variant']} | {seeds} | {rate_text(r['success_rate'], seeds)} "
        f"| {rate_text(r['success_rate_nontarget_clean'], seeds)} | {rate_text(r['oracle_rate'], seeds)} "
        f"| {float(r['asr_after_median']):.3f} | {float(r['clean_full_drop_median']) * 100:.1f} "
        f"| {float(r['target_class_acc_median']):.2f} |"
    )


def rate_text(rate, seeds: int) -> str:
    """A rate over seeds as ``20% [6%-51%]`` (Wilson; the count recovered from the rate: rows
    saved before the intervals carry only the rate)."""
    rate = float(rate)
    low, high = wilson(round(rate * seeds), seeds)
    return f"{rate:.0%} [{low:.0%}-{high:.0%}]"


def one_line(record: dict) -> str:
    parts = [f"{record['model']} seed {record['seed']} collapse class {record['histogram']['collapse_class']}"]
    for variant, outcome in record["variants"].items():
        after = outcome["after"]
        parts.append(f"{variant} {after['asr']:.2f}/{after['clean_full']:.3f}{'*' if after['success'] else ''}")
    return " | ".join(parts) + f" ({record['seconds']:.0f} s)"


if __name__ == "__main__":
    harness.run(main)
