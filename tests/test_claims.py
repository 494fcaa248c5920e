"""Claims equal output: every demo figure that README.md and docs/ quote is rendered here from the
saved results in benchmarks/results/ (the demo's own summary, log lines and headline) and must
appear in the text exactly as rendered; the heavy test reruns `rnp-fast demo` and checks that the
saved results, and so the quotes, are what it writes and prints.

A quote is a template below: change a figure in the text, or in the results, and its test fails
naming the sentence expected. In the README's Quick start and Demo sections every decimal outside
inline code must belong to a quote, so a new figure there cannot go unchecked.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests_support import benchmark_module

from rnp_fast.repeats import headline

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
CHECKED_SECTIONS = {"README.md": ["Quick start", "Demo"]}  # every decimal there must be quoted


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def namespace(value):
    """JSON as attributes (``{demo.s.asr_after:.2f}`` in a template)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [namespace(v) for v in value]
    return value


def joined(values, spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def row(values, spec: str) -> str:
    return " | ".join(format(v, spec) for v in values)


def log_line(printed: list[str], pattern: str) -> str:
    """The demo's last log line that starts with the regular expression ``pattern``."""
    lines = [line for line in printed if re.match(pattern, line)]
    assert lines, f"the demo printed no line starting {pattern!r}"
    return lines[-1]


# ------------------------------------------------------------------------------------------------
# The figures: one namespace per source


def demo_figures(summary: dict, config: dict, printed: list[str]) -> SimpleNamespace:
    """The single demo (seed 0): its summary.json, config.json and log; the text's words for the
    verdict are the product's own (summary.json's ``verdict``)."""
    s = namespace(summary)
    verdict, failed = summary["verdict"], summary["verdict"]["failed"]
    sizes = r"(\d+) defense images, (\d+) held out"
    defense, held_out = map(int, re.match(sizes, log_line(printed, sizes)).groups())
    return SimpleNamespace(
        s=s,
        cfg=namespace(config),
        drop_points=summary["clean_acc_full_drop"] * 100,
        nontarget_drop_points=summary["clean_acc_drop"] * 100,
        removes="removes the backdoor" if "asr_after" not in failed else "leaves the backdoor",
        bound="within" if "clean_acc_full_drop" not in failed else "more than",
        verdict="a success" if verdict["success"] else "not a success",
        after_line=log_line(printed, "after defense:"),
        defense_images=defense + held_out,
        held_out=held_out,
        ratio_pct=config["DataConfig"]["ratio"] * 100,
        holdout_pct=config["DataConfig"]["holdout"] * 100,
    )


def repeats_figures(run: dict) -> SimpleNamespace:
    """A `demo --repeats` run: its summary with the per-seed lists the text quotes."""
    result = run["repeats"]
    seeds = result["per_seed"]
    gone = [r for r in seeds if r["failed"] is not None and "asr_after" not in r["failed"]]  # its verdict: ASR met
    return SimpleNamespace(
        r=namespace(result),
        headline=headline(result),
        seeds=seeds,
        gone_seeds=", ".join(str(r["seed"]) for r in gone),
        gone_asr=joined([r["asr_after"] for r in gone], ".2f"),
        gone_clean=joined([r["clean_acc_full_after"] for r in gone], ".3f"),
        gone_drop_min=min(r["clean_full_drop"] for r in gone) * 100 if gone else None,
        gone_drop_max=max(r["clean_full_drop"] for r in gone) * 100 if gone else None,
        gone_count=len(gone),
        asr_list=joined([r["asr_after"] for r in seeds], ".2f"),
        clean_full_list=joined([r["clean_acc_full_after"] for r in seeds], ".3f"),
        asr_row=row([r["asr_after"] for r in seeds], ".2f"),
        clean_row=row([r["clean_acc_after"] for r in seeds], ".3f"),
        clean_full_row=row([r["clean_acc_full_after"] for r in seeds], ".3f"),
        pruned_row=row([r["pruned"] for r in seeds], "d"),
        any_text="any seed" if result["any_threshold_succeeds"]["count"] == 0 else "some seeds",
        before_full=seeds[0]["clean_acc_full_before"],
        seconds=result["seconds"]["mean"],
    )


def study_figures() -> SimpleNamespace:
    """benchmarks/robustness_study.py's demo seeds (`paper`: RNP as shipped) and its table."""
    study = load("robustness_digits_cpu.json")
    demo = sorted((r for r in study["records"] if r["model"] == "demo"), key=lambda r: r["seed"])
    paper = [r["variants"]["paper"] for r in demo]
    per_seed = ", ".join(
        f"{r['seed']}: {p['after']['asr']:.2f} / {(p['before']['clean_full'] - p['after']['clean_full']) * 100:.1f}"
        + (" (nothing pruned)" if p["after"]["pruned"] == 0 else "")
        for r, p in zip(demo, paper, strict=True)
    )
    detected = sum(
        r["histogram"]["collapse_class_share"] == 1.0 and r["histogram"]["collapse_class"] == 0 for r in demo
    )
    with open(RESULTS / "robustness_digits_cpu.csv", newline="") as handle:
        rows = [benchmark_module("robustness_study").table_row(line) for line in csv.DictReader(handle)]
    return SimpleNamespace(
        per_seed=per_seed,
        seed0=namespace(paper[0]),
        seed8=namespace(paper[8]),
        detected=detected,
        seeds=len(demo),
        rows=rows,
    )


def bench_figures() -> SimpleNamespace:
    """`rnp-fast bench --device cpu --repeats 5` on the demo workload: warm medians per phase."""
    bench = load("bench_demo_cpu.json")
    med = bench["warm_median_seconds"]
    learn = {mode: med[mode]["unlearn"] + med[mode]["recover"] for mode in med}
    phases = {
        p: namespace({m: med[m][p] for m in med} | {"x": med["reference"][p] / med["fast"][p]}) for p in med["fast"]
    }
    return SimpleNamespace(
        learn=namespace(learn | {"x": learn["reference"] / learn["fast"]}),
        cold=namespace({m: bench["cold_seconds"][m]["total"] for m in bench["cold_seconds"]}),
        **phases,
    )


def sweep_figures() -> SimpleNamespace:
    """benchmarks/readme_sweep.py: the README's sweep file as run, and its report's table."""
    sweep = load("readme_sweep_cpu.json")
    return SimpleNamespace(
        file=sweep["sweep_file"], rows=[line for line in sweep["results_md"] if line.startswith("|")]
    )


def micro_figures() -> SimpleNamespace:
    """`make bench-micro`: each row's median in ms, named by its variant (``pytorch_eager_fwd``)."""
    micro = load("micro_cpu.json")
    variant = re.compile(r"\[(.*)\]")
    ms = {
        re.sub(r"\W", "_", variant.search(row["name"]).group(1)): row["stats"]["median"] * 1e3
        for row in micro["benchmarks"]
    }
    return SimpleNamespace(
        **ms,
        fused_x_unlearn=ms["one_at_a_time_unlearn"] / ms["fused_unlearn"],
        fused_x_recover=ms["one_at_a_time_recover"] / ms["fused_recover"],
    )


def parallel_figures() -> SimpleNamespace:
    """benchmarks/bench_parallel.py: one job at a time against the default, step rates, fused arrays."""
    bench = load("parallel_digits_cpu.json")

    def speedups(stage: str) -> str:
        values = [f"{case['fused_speedup']:.2f}x" for case in bench["fused"][stage].values()]
        return ", ".join(values[:-1]) + " and " + values[-1]

    def worst(stage: str) -> float:
        return max(case["max_abs_difference_after_the_steps"]["parameters"] for case in bench["fused"][stage].values())

    return SimpleNamespace(
        b=namespace(bench),
        step1=bench["step_rate"]["threads_1"]["fraction_of_matmul_rate"] * 100,
        step2=bench["step_rate"]["threads_2"]["fraction_of_matmul_rate"] * 100,
        runs=len(bench["sweep"]["one_at_a_time"]["runs_s"]),
        unlearn=speedups("unlearn"),
        recover=speedups("recover"),
        unlearn_worst=f"{worst('unlearn'):.1e}".replace("e-0", "e-"),
        recover_worst=f"{worst('recover'):.1e}".replace("e-0", "e-"),
    )


def agreeing_seeds(study: dict, per_seed: list[dict]) -> str:
    """'all N seeds' when the study's `paper` variant and `demo --repeats` agree on every seed's
    pruned count, ASR and full-test clean accuracy, else 'K of N seeds'."""
    paper = {r["seed"]: r["variants"]["paper"]["after"] for r in study["records"] if r["model"] == "demo"}
    same = sum(
        (paper[r["seed"]]["pruned"], paper[r["seed"]]["asr"], paper[r["seed"]]["clean_full"])
        == (r["pruned"], r["asr_after"], r["clean_acc_full_after"])
        for r in per_seed
    )
    return f"all {same} seeds" if same == len(per_seed) else f"{same} of {len(per_seed)} seeds"


def saved_figures() -> dict:
    """Every source as saved in benchmarks/results/."""
    single = load("demo_cpu.json")["runs"]["single"]
    repeats = load("demo_repeats_cpu.json")["runs"]
    goal = repeats["data"]["repeats"]["goal"]
    return {
        "demo": demo_figures(single["summary"], single["config"], single["printed"]),
        "data": repeats_figures(repeats["data"]),
        "order": repeats_figures(repeats["order"]),
        "goal": namespace(goal | {"points": goal["max_clean_drop"] * 100}),
        "study": study_figures(),
        "bench": bench_figures(),
        "sweep": sweep_figures(),
        "agree": agreeing_seeds(load("robustness_digits_cpu.json"), repeats["data"]["repeats"]["per_seed"]),
        "micro": micro_figures(),
        "par": parallel_figures(),
    }


# ------------------------------------------------------------------------------------------------
# The quotes: (file, template); each template, rendered, must appear in the file (spaces and line
# breaks count as one space)

CLAIMS = [
    # README: Quick start
    ("README.md", "its defense takes {demo.s.seconds:.0f} s on an idle 2-core CPU"),
    (
        "README.md",
        "On this model the chosen threshold {demo.removes} (ASR {demo.s.asr_before:.2f} -> {demo.s.asr_after:.2f}) at "
        "a cost of {demo.drop_points:.1f} points of full-test clean accuracy ({demo.s.clean_acc_full_before:.3f} -> "
        "{demo.s.clean_acc_full_after:.3f}), {demo.bound} the {goal.points:g} points the success criterion allows: "
        "{demo.verdict}. Over {data.r.success.of} defense-data seeds it succeeds on {data.r.success.count} of "
        "{data.r.success.of}",
    ),
    # README: Demo
    ("README.md", "Its log says (95 % intervals in brackets): ```\n{demo.after_line}\n```"),
    (
        "README.md",
        "| before | {demo.s.clean_acc_before:.3f} | {demo.s.asr_before:.3f} | {demo.s.clean_acc_full_before:.3f} |",
    ),
    (
        "README.md",
        "| after (threshold {demo.s.threshold:g} chosen by the rule, {demo.s.pruned} channels pruned) | "
        "{demo.s.clean_acc_after:.3f} | {demo.s.asr_after:.3f} | {demo.s.clean_acc_full_after:.3f} |",
    ),
    (
        "README.md",
        "full-test clean accuracy falls {demo.drop_points:.1f} points ({demo.nontarget_drop_points:.1f} on the "
        "reference protocol's non-target accuracy), nearly all of it on the target digit (its test accuracy "
        "{study.seed0.before.target_class_acc:.2f} -> {study.seed0.after.target_class_acc:.2f}): by the success "
        "criterion (ASR <= {goal.max_asr:g} at a full-test clean drop <= {goal.points:g} points) {demo.verdict}.",
    ),
    ("README.md", "clean accuracy {demo.s.clean_acc_full_before:.3f}, ASR {demo.s.asr_before:.3f}) was made with"),
    (
        "README.md",
        "{demo.ratio_pct:g} % of it as defense data ({demo.defense_images} images), "
        "{demo.holdout_pct:g} % of that held out ({demo.held_out} images;",
    ),
    (
        "README.md",
        "batch {demo.cfg.DataConfig.batch_size} (128 gives two steps per epoch and unlearning collapses the model "
        "within one), unlearning lr {demo.cfg.RNPConfig.unlearning_lr:g}, recovering lr "
        "{demo.cfg.RNPConfig.recovering_lr:g}.",
    ),
    ("README.md", "```\n{data.headline}\n```"),
    (
        "README.md",
        "Where the backdoor goes (seeds {data.gone_seeds}: ASR after {data.gone_asr}) the cost falls mostly on the "
        "target digit (full-test clean accuracy {data.gone_clean}), and no threshold of the schedule would have "
        "succeeded on {data.any_text}.",
    ),
    (
        "README.md",
        "(`--repeat-over order`) succeeds on {order.r.success.count} of {order.r.success.of} draws "
        "({order.r.success_nontarget.count} of {order.r.success.of} on non-target accuracy)",
    ),
    ("README.md", "images on every demo seed ({study.detected} of {study.seeds})"),
    # README: Performance (the demo workload)
    (
        "README.md",
        "| unlearn + recover | {bench.learn.reference:.3f} | {bench.learn.fast:.3f} | {bench.learn.x:.2f}x |",
    ),
    (
        "README.md",
        "| evaluation (per epoch, scoring, before/after) | {bench.evaluation.reference:.3f} | "
        "{bench.evaluation.fast:.3f} | {bench.evaluation.x:.2f}x |",
    ),
    (
        "README.md",
        "| **total** (with data and writing outputs) | **{bench.total.reference:.3f}** | **{bench.total.fast:.3f}** | "
        "**{bench.total.x:.2f}x** |",
    ),
    # docs/performance.md
    *[
        (
            "docs/performance.md",
            f"| {label} | {{bench.{phase}.reference:.3f}} | {{bench.{phase}.fast:.3f}} | {{bench.{phase}.x:.2f}}x |",
        )
        for phase, label in [
            ("data", "data"),
            ("unlearn", "unlearn"),
            ("recover", "recover"),
            ("evaluation", "evaluation (per epoch, scoring, before/after)"),
            ("other", "other (writing outputs)"),
        ]
    ],
    ("docs/performance.md", "cold (first) runs: reference {bench.cold.reference:.1f} s, fast {bench.cold.fast:.1f} s"),
    (
        "docs/performance.md",
        "On the demo's model (60 epochs with augmentation) the rule brings the ASR to <= {goal.max_asr:g} on "
        "{data.gone_count} of {data.r.success.of} defense-data seeds, each time at a cost of "
        "{data.gone_drop_min:.1f}-{data.gone_drop_max:.1f} points of full-test clean accuracy, so it succeeds on "
        "none of the {data.r.success.of}",
    ),
    # docs/efficacy.md
    (
        "docs/efficacy.md",
        "succeeds on {data.r.success.count} of {data.r.success.of} seeds on full-test and "
        "{data.r.success_nontarget.count} of {data.r.success.of} on non-target clean accuracy:",
    ),
    ("docs/efficacy.md", "| ASR after | {data.asr_row} |"),
    ("docs/efficacy.md", "| clean after, non-target | {data.clean_row} |"),
    ("docs/efficacy.md", "| clean after, full test ({data.before_full:.3f} before) | {data.clean_full_row} |"),
    ("docs/efficacy.md", "| channels pruned | {data.pruned_row} |"),
    (
        "docs/efficacy.md",
        "success on {order.r.success.count} of {order.r.success.of} draws on full-test and "
        "{order.r.success_nontarget.count} of {order.r.success.of} on non-target accuracy, some threshold would "
        "have succeeded on {order.r.any_threshold_succeeds.count} of {order.r.success.of}; ASR after "
        "{order.asr_list} at full-test clean accuracy {order.clean_full_list}.",
    ),
    ("docs/efficacy.md", "per demo seed (ASR after / full-test clean drop in points) {study.per_seed}."),
    ("docs/efficacy.md", "the study's `paper` variant (one thread per process) give the same figures on {agree}"),
    (
        "docs/efficacy.md",
        "(seed 0: ASR {data.seeds[0][asr_after]:.2f}, full-test clean {data.seeds[0][clean_acc_full_after]:.3f}, "
        "{data.seeds[0][pruned]} channels pruned at threshold {data.seeds[0][threshold]:g}, as the shipped demo; "
        "seed 9: ASR {data.seeds[9][asr_after]:.3f}, {data.seeds[9][pruned]} pruned)",
    ),
    (
        "README.md",
        "on 2 cores a 4-job digits sweep ran {par.b.sweep.one_at_a_time_over_default:.2f}x faster than one job "
        "at a time",
    ),
    # docs/performance.md: many defenses on one CPU
    (
        "docs/performance.md",
        "runs at {par.step1:.0f} % of this CPU's fp32 matrix-product rate with one thread and at {par.step2:.0f} % "
        "with two",
    ),
    (
        "docs/performance.md",
        "On this machine ({par.b.cpu_model}, {par.b.machine.cores_available} cores available, idle), medians of "
        "{par.runs} runs after a warm-up",
    ),
    (
        "docs/performance.md",
        "| 4-job digits sweep (README's, BadNets and Blend x 2 seeds, 20 training epochs) | "
        "{par.b.sweep.one_at_a_time.median_s:.0f} s | {par.b.sweep.default.median_s:.0f} s | "
        "{par.b.sweep.one_at_a_time.defenses_per_hour:.0f} -> {par.b.sweep.default.defenses_per_hour:.0f} | "
        "{par.b.sweep.one_at_a_time_over_default:.2f}x |",
    ),
    (
        "docs/performance.md",
        "| `rnp-fast demo --repeats 4` | {par.b.repeats.one_at_a_time.median_s:.0f} s | "
        "{par.b.repeats.default.median_s:.0f} s | {par.b.repeats.one_at_a_time.defenses_per_hour:.0f} -> "
        "{par.b.repeats.default.defenses_per_hour:.0f} | {par.b.repeats.one_at_a_time_over_default:.2f}x |",
    ),
    (
        "docs/performance.md",
        "fused is {par.unlearn} as fast at K = 1, 2, 4, 8, 16 for unlearning and {par.recover} for recovering",
    ),
    (
        "docs/performance.md",
        "fusing 4 models paid {micro.fused_x_unlearn:.1f}x for unlearning and {micro.fused_x_recover:.1f}x for "
        "recovering",
    ),
    (
        "docs/performance.md",
        "differ from the separate ones by up to {par.unlearn_worst} (unlearning) and {par.recover_worst} "
        "(recovering) on a parameter",
    ),
    # docs/performance.md: the micro-benchmarks (ms)
    (
        "docs/performance.md",
        "| masked BatchNorm, forward | eager {micro.pytorch_eager_fwd:.3f} ms, compiled "
        "{micro.pytorch_compiled_fwd:.3f} ms, operator {micro.operator_fwd:.3f} ms, Triton interpreter "
        "{micro.triton_kernels_fwd:.1f} ms |",
    ),
    (
        "docs/performance.md",
        "| masked BatchNorm, forward + backward | eager {micro.pytorch_eager_fwd_bwd:.3f} ms, compiled "
        "{micro.pytorch_compiled_fwd_bwd:.3f} ms, operator {micro.operator_fwd_bwd:.3f} ms, Triton interpreter "
        "{micro.triton_kernels_fwd_bwd:.1f} ms |",
    ),
    (
        "docs/performance.md",
        "| scoring the candidates | sequential {micro.sequential:.0f} ms, reference {micro.reference:.0f} ms, "
        "batched {micro.batched:.0f} ms (no shared prefix: see above) |",
    ),
    (
        "docs/performance.md",
        "| a learning step (demo model, batch 32) | eager {micro.eager:.1f} ms, compiled {micro.compiled:.1f} ms |",
    ),
    (
        "docs/performance.md",
        "| an epoch of augmented defense images | device-resident loader {micro.device:.1f} ms, DataLoader "
        "{micro.dataloader:.1f} ms |",
    ),
    (
        "docs/performance.md",
        "| one step of 4 models (width 0.125, batch 16) | unlearn: one at a time "
        "{micro.one_at_a_time_unlearn:.0f} ms, fused {micro.fused_unlearn:.0f} ms; recover: "
        "{micro.one_at_a_time_recover:.0f} ms, {micro.fused_recover:.0f} ms |",
    ),
]
# whole tables and files: every rendered line must appear
TABLE_CLAIMS = [
    ("docs/efficacy.md", "study", "rows"),
    ("docs/sweeps.md", "sweep", "rows"),
    ("README.md", "sweep", "file"),
]


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def rendered(figures: dict) -> list[tuple[str, str]]:
    claims = [(doc, flat(template.format(**figures))) for doc, template in CLAIMS]
    for doc, source, field in TABLE_CLAIMS:
        lines = getattr(figures[source], field)
        claims += [(doc, flat(line)) for line in ([lines] if isinstance(lines, str) else lines)]
    return claims


def missing_claims(figures: dict, texts: dict[str, str] | None = None) -> list[str]:
    """Every rendered quote not in its file (``texts``: the files' text, default read from disk)."""
    texts = {
        name: flat(text) for name, text in (texts or {n: (REPO / n).read_text(encoding="utf-8") for n in DOCS}).items()
    }
    return [f"{doc} should say: {text}" for doc, text in rendered(figures) if text not in texts[doc]]


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def unquoted_decimals(text: str, quotes: list[str]) -> list[str]:
    """Decimals in ``text`` outside inline code and outside every quote."""
    text = flat(text)
    covered = [False] * len(text)
    for quote in quotes:
        for match in re.finditer(re.escape(quote), text):
            covered[match.start() : match.end()] = [True] * (match.end() - match.start())
    for match in re.finditer(r"`[^`]*`", text):  # commands and flags, not figures
        covered[match.start() : match.end()] = [True] * (match.end() - match.start())
    return [
        f"{m.group()} in '...{text[max(0, m.start() - 40) : m.end() + 20]}...'"
        for m in re.finditer(r"\d*\.\d+", text)
        if not all(covered[m.start() : m.end()])
    ]


# ------------------------------------------------------------------------------------------------
# Quick tests: the text against the saved results


def test_every_quoted_demo_figure_equals_the_saved_results():
    missing = missing_claims(saved_figures())
    assert not missing, "quoted figures differ from benchmarks/results/:\n" + "\n".join(missing)


def test_every_figure_in_the_quick_start_and_demo_sections_is_a_checked_quote():
    quotes = [text for doc, text in rendered(saved_figures()) if doc == "README.md"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stray = [f for title in CHECKED_SECTIONS["README.md"] for f in unquoted_decimals(section(readme, title), quotes)]
    assert not stray, "figures no test checks (add them to tests/test_claims.py's CLAIMS):\n" + "\n".join(stray)


def test_a_changed_figure_fails_the_check():
    """The check can fail: the Quick start's drop changed in a copy of the README is named."""
    figures = saved_figures()
    texts = {name: (REPO / name).read_text(encoding="utf-8") for name in DOCS}
    drop = f"{figures['demo'].drop_points:.1f} points of full-test"
    assert drop in flat(texts["README.md"])
    texts["README.md"] = flat(texts["README.md"]).replace(drop, "0.5 points of full-test")
    missing = missing_claims(figures, texts)
    assert len(missing) == 1 and drop in missing[0], missing


def test_docs_link_and_cite_only_files_inside_the_repository():
    problems = []
    for name in DOCS:
        text = (REPO / name).read_text(encoding="utf-8")
        base = (REPO / name).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (base / target).resolve()
            if not path.is_relative_to(REPO) or not path.exists():
                problems.append(f"{name} links {target}")
        for cited in set(re.findall(r"benchmarks/results/[\w.\-]+\.(?:json|csv)", text)):
            if not (REPO / cited).is_file():
                problems.append(f"{name} cites {cited}, which does not exist")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Heavy: the saved results against a fresh demo


FIGURES = ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "clean_acc_full_before")
FIGURES += ("clean_acc_full_after", "robust_acc_before", "robust_acc_after", "der")


@pytest.mark.heavy
def test_the_saved_demo_results_are_what_the_demo_prints(demo_run):
    out, printed_text, _ = demo_run
    fresh = json.loads((out / "summary.json").read_text())
    printed = benchmark_module("demo_runs").printed_lines(printed_text)
    saved = load("demo_cpu.json")["runs"]["single"]
    seed0 = load("demo_repeats_cpu.json")["runs"]["data"]["repeats"]["per_seed"][0]
    for key in FIGURES:  # as the log prints them: 4 decimals
        assert round(fresh[key], 4) == round(saved["summary"][key], 4), key
    for key in ("threshold", "pruned"):
        assert fresh[key] == saved["summary"][key] == seed0[key], key
    for key in ("asr_after", "clean_acc_after", "clean_acc_full_after"):
        assert round(fresh[key], 4) == round(seed0[key], 4), key
    assert log_line(printed, "after defense:") == log_line(saved["printed"], "after defense:")
    # and the text against the fresh run directly
    figures = saved_figures()
    config = json.loads((out / "config.json").read_text())
    timed_as_saved = {**fresh, "seconds": saved["summary"]["seconds"]}  # a time is the saved idle run's, not this one's
    figures["demo"] = demo_figures(timed_as_saved, config, printed)
    missing = missing_claims(figures)
    assert not missing, "quoted figures differ from a fresh `rnp-fast demo`:\n" + "\n".join(missing)


def test_demo_runs_script_says_what_it_does():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "demo_runs.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "single" in result.stdout and "repeats" in result.stdout, result.stderr
