"""The defense over several seeds: the aggregation by hand, and a tiny real run's files."""

import csv
import json
import math
import re
from dataclasses import replace

import pytest
from tests_support import TINY_WIDTH, strict_json_files

from rnp_fast.evaluation.metrics import Metrics
from rnp_fast.repeats import CurvePoint, Goal, SeedOutcome, aggregate, headline

SHORT = dict(unlearning_epochs=1, recovering_epochs=2, clean_threshold=0.0, pruning_step=0.3, allow_small_holdout=True)


def metrics(asr: float, clean_full: float, clean: float | None = None) -> Metrics:
    clean = clean_full if clean is None else clean
    return Metrics(clean, 0.0, asr, 0.0, clean_full, 0.0)


def outcome(seed: int, asr: float, clean_full: float, curve=(), clean: float | None = None) -> SeedOutcome:
    points = [CurvePoint(0.1 * i, i, a, c, c) for i, (a, c) in enumerate(curve)]
    return SeedOutcome(seed, metrics(1.0, 0.98), metrics(asr, clean_full, clean), 0.2, 10, points, 0)


def test_success_needs_both_a_low_asr_and_a_small_clean_drop():
    goal = Goal(max_asr=0.1, max_clean_drop=0.02)
    outcomes = [
        outcome(0, asr=0.05, clean_full=0.97),  # success
        outcome(1, asr=0.05, clean_full=0.95),  # too costly
        outcome(2, asr=0.50, clean_full=0.98, curve=[(0.5, 0.98), (0.08, 0.965)]),  # missed, a threshold existed
        outcome(3, asr=0.10, clean_full=0.955, clean=0.99),  # passes on non-target clean accuracy only
    ]
    result = aggregate(outcomes, goal)
    assert result["success"] == {
        "rate": 0.25,
        "count": 1,
        "of": 4,
        "std_error": pytest.approx(math.sqrt(0.25 * 0.75 / 4)),
        "ci95": pytest.approx([0.0456, 0.6994], abs=1e-4),  # Wilson, 1 of 4
    }
    assert [r["success"] for r in result["per_seed"]] == [True, False, False, False]
    assert [r["success_nontarget"] for r in result["per_seed"]] == [True, False, False, True]
    assert [r["any_threshold_succeeds"] for r in result["per_seed"]] == [False, False, True, False]
    assert result["asr_after"]["mean"] == pytest.approx(0.175)
    assert result["asr_after"]["min"] == 0.05 and result["asr_after"]["max"] == 0.5
    assert result["clean_full_drop"]["max"] == pytest.approx(0.03)
    assert result["success_nontarget"]["count"] == 2
    assert "1 of 4 seeds" in headline(result)


def test_the_headline_says_when_seeds_ran_side_by_side():
    """A seed's seconds are its worker's: with 2 at once they are not the wall time per seed."""
    timed = [replace(outcome(seed, asr=0.05, clean_full=0.97), seconds=30.0) for seed in (0, 1)]
    result = aggregate(timed, Goal())
    assert headline(result).endswith("; 30.0 s per seed")
    assert headline({**result, "processes": 2}).endswith("; 30.0 s per seed (2 at once)")
    assert "s per seed" not in headline(aggregate([outcome(0, asr=0.05, clean_full=0.97)], Goal()))


def test_thresholds_of_success_are_configurable():
    loose = aggregate([outcome(0, asr=0.3, clean_full=0.95)], Goal(max_asr=0.5, max_clean_drop=0.05))
    strict = aggregate([outcome(0, asr=0.3, clean_full=0.95)], Goal())
    assert loose["success"]["count"] == 1 and strict["success"]["count"] == 0


def test_no_seeds_is_an_error():
    with pytest.raises(ValueError):
        aggregate([], Goal())


def tiny_job(model, out):
    from test_pipeline import job

    return job(model, out, rnp=SHORT)


def test_a_tiny_repeated_run_reports_every_seed_and_writes_its_files(tiny_checkpoint, tmp_path, capsys):
    from rnp_fast.cli import main
    from rnp_fast.defense import run_defense

    out = tmp_path / "repeats"
    tiny = ["--width", str(TINY_WIDTH), "--dataset", "digits", "--ratio", "0.1", "--batch-size", "32"]
    tiny += ["--eval-batch-size", "256", "--unlearning-epochs", "1", "--recovering-epochs", "2"]
    tiny += ["--clean-threshold", "0", "--pruning-step", "0.3", "--device", "cpu", "--quiet", "--allow-small-holdout"]
    code = main(["defend", "--model", str(tiny_checkpoint), "--out", str(out), *tiny, "--seed", "3", "--repeats", "2"])
    assert code == 0
    assert "success (ASR <= 0.1, clean drop <= 2 points) on" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"summary.json", "seeds.csv", "tradeoff.png", "output.log"}
    stored = strict_json_files(out)["summary.json"]["repeats"]  # strict: NaN or Infinity would raise
    assert stored["seeds"] == [3, 4] and stored["success"]["of"] == 2
    assert all(row["seconds"] > 0 for row in stored["per_seed"]) and stored["seconds"]["max"] > 0
    lo, hi = stored["success"]["ci95"]  # Wilson: never the empty 0 +- 0
    assert lo <= stored["success"]["rate"] <= hi and hi - lo > 0.3
    rows = list(csv.DictReader((out / "seeds.csv").open()))
    assert [int(r["seed"]) for r in rows] == [3, 4]
    assert int(rows[0]["asr_after_n"]) > 0 and float(rows[0]["asr_after_ci95_lo"]) <= float(rows[0]["asr_after"])
    assert float(rows[0]["clean_full_drop_ci95_lo"]) <= float(rows[0]["clean_full_drop"])
    # every seed is the single defense on that seed: the same figures as a separate run
    job = tiny_job(tiny_checkpoint, tmp_path / "single")
    single = run_defense(replace(job, data=replace(job.data, seed=4)))
    assert stored["per_seed"][1]["asr_after"] == single["asr_after"]
    assert stored["per_seed"][1]["clean_acc_full_after"] == single["clean_acc_full_after"]
    assert stored["per_seed"][1]["pruned"] == single["pruned"]
    assert stored["per_seed"][1]["success"] == single["verdict"]["success"]  # one verdict for both
    assert stored["per_seed"][1]["asr_after_ci95"] == single["asr_after_ci95"]


def test_repeats_over_order_keep_the_defense_images_and_draw_only_their_order(tiny_checkpoint, tmp_path, capsys):
    import torch

    from rnp_fast.cli import main
    from rnp_fast.defense import compute_defense, load_inputs
    from rnp_fast.repeats import defend_seeds
    from rnp_fast.resolved import resolve_run

    job = replace(tiny_job(tiny_checkpoint, None), data=replace(tiny_job(tiny_checkpoint, None).data, seed=3))
    run = resolve_run(job.model, job.data, job.attack, job.engine)
    inputs = load_inputs(job, run)
    own, drawn = compute_defense(job, run, inputs), compute_defense(job, run, inputs, order_seed=4)
    assert torch.equal(own.loaded.data.train.images, drawn.loaded.data.train.images)  # the same images
    assert torch.equal(own.loaded.data.holdout.labels, drawn.loaded.data.holdout.labels)  # the same hold-out
    first_batch = [next(iter(d.loaded.loader))[1] for d in (own, drawn)]
    assert not torch.equal(*first_batch)  # in another order
    other_data = compute_defense(job, run, inputs, seed=4)
    assert not torch.equal(own.loaded.data.train.images, other_data.loaded.data.train.images)
    outcomes, _ = defend_seeds(job, [3, 4], over="order")
    assert outcomes[1].after == drawn.pruning.after and outcomes[0].after == own.pruning.after

    out = tmp_path / "order"
    tiny = ["--width", str(TINY_WIDTH), "--dataset", "digits", "--ratio", "0.1", "--batch-size", "32"]
    tiny += ["--eval-batch-size", "256", "--unlearning-epochs", "1", "--recovering-epochs", "2"]
    tiny += ["--clean-threshold", "0", "--pruning-step", "0.3", "--device", "cpu", "--quiet", "--allow-small-holdout"]
    flags = ["--seed", "3", "--repeats", "2", "--repeat-over", "order"]
    assert main(["defend", "--model", str(tiny_checkpoint), "--out", str(out), *tiny, *flags]) == 0
    stored = json.loads((out / "summary.json").read_text())["repeats"]
    assert stored["over"] == "order" and stored["seeds"] == [3, 4]
    assert stored["per_seed"][1]["asr_after"] == drawn.pruning.after.asr


def comparable(lines: list[str]) -> list[str]:
    """A log's lines without their times (stamps, epoch seconds, seed seconds, a step's "done in"),
    sorted: the losses, accuracies and pruning rows, to 4 decimals, whatever order the seeds
    finished in."""
    kept = []
    for line in lines:
        text = re.sub(r": done in \d+(\.\d+)? s$", ": done", line.split("] - ", 1)[1])
        fields = text.split(" \t ")
        if fields[0].isdigit() and len(fields) > 3:  # an epoch row: epoch, lr, seconds, losses...
            del fields[2]
        kept.append(" \t ".join(fields).rsplit(" (", 1)[0] if text.startswith("seed ") else " \t ".join(fields))
    return sorted(kept)


@pytest.mark.heavy  # two worker processes start, import torch and defend: ~20-30 s on 2 busy cores
def test_seeds_in_two_worker_processes_equal_one_at_a_time_with_one_thread(tiny_checkpoint, tmp_path):
    import torch

    from rnp_fast.repeats import defend_seeds, run_repeats
    from rnp_fast.runlog import RunLog

    job = tiny_job(tiny_checkpoint, str(tmp_path / "parallel"))
    parallel = run_repeats(job, [3, 4], jobs_per_device=2)
    assert parallel["processes"] == 2 and parallel["threads"] == 1  # the summary says how they ran
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log = RunLog(None, quiet=True, keep=True)
    try:
        one_at_a_time, _ = defend_seeds(job, [3, 4], log=log, processes=1)
    finally:
        torch.set_num_threads(threads)
    rows = [o.row(Goal()) for o in one_at_a_time]
    for row, stored in zip(rows, parallel["per_seed"], strict=True):
        assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in stored.items() if k != "seconds"}
    parallel_log = (tmp_path / "parallel" / "output.log").read_text().splitlines()
    first, *seed_lines = parallel_log
    assert "2 seeds, 2 at once, 1 torch thread(s) each: as asked (--jobs-per-device 2)" in first
    seed_lines = [line for line in seed_lines if "seed \t threshold" not in line][: len(log.lines)]
    assert comparable(seed_lines) == comparable(log.lines)  # every epoch's losses and every pruning row
