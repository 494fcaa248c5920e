"""`rnp-fast sweep` and `rnp-fast report`: sweep files, the results store, resuming, backends.

The end-to-end sweep is the issue's: 3 attacks x 2 seeds x 2 RNP alphas on the digits set with a
width-0.125 ResNet-18, trained and defended in a few seconds per job (the numbers are meaningless;
the bookkeeping is what is tested).
"""

import importlib.util
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from tests_support import TINY_WIDTH, dead_pid, strict_json, strict_json_files

from rnp_fast.cli import main
from rnp_fast.config import SweepRunConfig
from rnp_fast.errors import UserError
from rnp_fast.outputs import RunDirectory
from rnp_fast.sweep.backends import SCRATCH_PREFIX
from rnp_fast.sweep.runner import run_sweep
from rnp_fast.sweep.spec import load_sweep
from rnp_fast.sweep.store import APPLICATION_ID, SCHEMA, NotAStore, ResultsStore, exclusive, open_existing

NO_RAY = importlib.util.find_spec("ray") is None
TINY_FIXED = f"""\
fixed:
  data: {{dataset: digits, ratio: 0.2, holdout: 0.25, batch_size: 64, augment: false, eval_batch_size: 1024}}
  model: {{arch: resnet18, width: {TINY_WIDTH}}}
  train: {{epochs: 2, lr: 0.05}}
  rnp: {{unlearning_lr: 0.005, unlearning_epochs: 1, recovering_epochs: 1, pruning_step: 0.3}}
  engine: {{mode: fast}}
  trigger:
    blend: {{alpha: 0.2}}
"""
TWELVE_JOBS = (
    TINY_FIXED
    + """\
axes:
  attack.attack: [badnets, blend, sig]
  seed: [0, 1]
  rnp.alpha: [0.2, 0.5]
"""
)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def sweep_command(sweep_file: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rnp_fast", "sweep", str(sweep_file), "--store", str(store), "--quiet", *extra]


def single_threaded_env() -> dict:
    # One thread everywhere: float sums in the same order in every process, so runs are comparable.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def done_rows(store: Path) -> dict[str, dict]:
    if not (store / "results.sqlite").is_file():
        return {}
    connection = sqlite3.connect(store / "results.sqlite", timeout=30)
    try:
        rows = connection.execute("SELECT hash, started_at, finished_at, attempts FROM jobs WHERE status = 'done'")
        return {h: {"started_at": s, "finished_at": f, "attempts": a} for h, s, f, a in rows.fetchall()}
    except sqlite3.OperationalError:  # the driver has not created the table yet
        return {}
    finally:
        connection.close()


# ----------------------------------------------------------------------------- sweep files


def test_twelve_jobs_expand_with_shared_models(tmp_path):
    sweep = load_sweep(write(tmp_path / "s.yaml", TWELVE_JOBS))
    assert len(sweep.jobs) == 12
    assert len({job.hash for job in sweep.jobs}) == 12
    # RNP's alpha does not change training: 3 attacks x 2 seeds = 6 backdoored models
    assert len({job.train_hash for job in sweep.jobs}) == 6
    first = sweep.jobs[0]
    assert (first.attack.attack, first.data.seed, first.attack.poison_seed, first.rnp.alpha) == ("badnets", 0, 0, 0.2)
    assert first.model.width == TINY_WIDTH and first.train.epochs == 2
    by_attack = {job.attack.attack: job for job in sweep.jobs}
    assert by_attack["sig"].attack.label_mode == "clean-label"  # SIG's own label mode
    assert by_attack["blend"].attack.trigger_params() == {"seed": 0, "alpha": 0.2}  # trigger.blend.alpha
    assert by_attack["badnets"].attack.attack_param == []


def test_jobs_that_resolve_alike_are_kept_once(tmp_path):
    # a blend parameter does not apply to badnets jobs: 2 blend jobs + 1 badnets job, not 4
    text = "axes:\n  attack.attack: [badnets, blend]\n  trigger.blend.alpha: [0.1, 0.3]\n"
    sweep = load_sweep(write(tmp_path / "s.yaml", text))
    assert sorted((j.attack.attack, j.attack.attack_param) for j in sweep.jobs) == [
        ("badnets", []),
        ("blend", ["alpha=0.1"]),
        ("blend", ["alpha=0.3"]),
    ]


def test_where_a_job_runs_is_not_part_of_its_identity(tmp_path):
    sweep = load_sweep(write(tmp_path / "s.yaml", TWELVE_JOBS))
    job = sweep.jobs[0]
    moved = replace(job, engine=replace(job.engine, device="cuda:3", quiet=True))
    assert moved.hash == job.hash
    assert replace(job, rnp=replace(job.rnp, alpha=0.9)).hash != job.hash


def test_engine_values_of_a_sweep_reach_training(tmp_path, monkeypatch):
    """engine.compile / engine.amp apply to the backdoor training too, and models trained with
    different precision are different models (their training hash differs)."""
    from rnp_fast import train
    from rnp_fast.sweep import execute

    text = "fixed:\n  engine: {compile: true}\naxes:\n  engine.amp: ['off', bf16]\n"
    jobs = load_sweep(write(tmp_path / "s.yaml", text)).jobs
    assert len({job.train_hash for job in jobs}) == 2
    seen = []

    def record(out, model, data, attack, train_config, engine, reuse=False):
        seen.append((engine.compile, engine.amp, reuse))
        raise RuntimeError("recorded")

    monkeypatch.setattr(train, "train_backdoor", record)
    for job in jobs:
        with pytest.raises(RuntimeError, match="recorded"):
            execute.backdoored_model(job, tmp_path / "models", "cpu")
    assert seen == [(True, "off", True), (True, "bf16", True)]


BAD_SWEEPS = {
    "unknown key": ("fixed:\n  rnp: {alfa: 0.2}\n", "fixed.rnp.alfa: unknown key"),
    "unknown top-level key": ("axis:\n  seed: [0]\n", "axis: unknown key"),
    "empty axis": ("axes:\n  rnp.alpha: []\n", "axes.rnp.alpha: empty axis"),
    "axis not a list": ("axes:\n  seed: 3\n", "axes.seed: expected a list"),
    "wrong type": ("fixed:\n  train: {epochs: three}\n", "fixed.train.epochs: expected int, got str 'three'"),
    "wrong type on an axis": ("axes:\n  data.augment: [true, 1]\n", "axes.data.augment: expected bool, got int 1"),
    "unknown attack parameter": (
        "fixed:\n  trigger: {blend: {beta: 0.5}}\n",
        "fixed.trigger.blend.beta: attack 'blend' has no parameter 'beta'",
    ),
    "attack parameter of the wrong type": (
        "fixed:\n  trigger: {blend: {alpha: [0.1]}}\n",
        "fixed.trigger.blend.alpha: expected a number, a string or null, got list [0.1]",
    ),
    "missing attack parameter": ("axes:\n  attack.attack: [user]\n", "trigger.user.pattern: attack 'user' needs"),
    "unknown attack": ("axes:\n  attack.attack: [badnets, nope]\n", "axes.attack.attack: unknown attack 'nope'"),
    "bad value": ("axes:\n  rnp.alpha: [0.2, -1]\n", "rnp: --alpha must be > 0"),
    "set twice": ("fixed:\n  rnp: {alpha: 0.2}\naxes:\n  rnp.alpha: [0.5]\n", "axes.rnp.alpha: also set under fixed"),
    "device": ("fixed:\n  engine: {device: cpu}\n", "fixed.engine.device: cannot be set in a sweep file"),
    "not YAML": ("fixed: [1, 2\n", "not valid YAML at line 2"),
}


@pytest.mark.parametrize("name", BAD_SWEEPS)
def test_bad_sweep_files_are_rejected_on_one_line_before_any_job(name, tmp_path, capsys):
    text, expected = BAD_SWEEPS[name]
    sweep_file = write(tmp_path / "bad.yaml", text)
    store = tmp_path / "store"
    assert main(["sweep", str(sweep_file), "--store", str(store)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith(f"rnp-fast: error: {sweep_file}: ") and expected in error, error
    assert not store.exists()  # nothing written


@pytest.mark.parametrize(
    ("command", "flag"), [("sweep", "--jobs-per-device"), ("sweep", "--jobs-per-gpu"), ("report", "--out")]
)
def test_sweep_commands_have_help(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_bad_options_are_rejected(tmp_path, capsys):
    sweep_file = write(tmp_path / "s.yaml", TWELVE_JOBS)
    for flag in ("--jobs-per-device", "--jobs-per-gpu"):  # the old name still works
        assert main(["sweep", str(sweep_file), "--store", str(tmp_path / "a"), flag, "0"]) == 2
        assert "--jobs-per-device must be in 1..1,024" in capsys.readouterr().err
    assert main(["sweep", str(sweep_file), "--store", str(tmp_path / "b"), "--address", "x:1"]) == 2
    assert "--address is for --backend ray" in capsys.readouterr().err


def test_missing_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    sweep_file = write(tmp_path / "s.yaml", TWELVE_JOBS)
    assert main(["sweep", str(sweep_file), "--store", str(tmp_path / "store"), "--backend", "ray"]) == 2
    assert "pip install 'rnp-fast[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- the store


def test_store_keeps_one_row_per_job_and_requeues(tmp_path):
    jobs = load_sweep(write(tmp_path / "s.yaml", TWELVE_JOBS)).jobs
    store = ResultsStore(tmp_path / "store")
    assert store.add_jobs(jobs, "s", 1.0) == 12
    assert store.add_jobs(jobs, "s", 2.0) == 0  # adding again adds nothing
    store.mark_running(jobs[0].hash, "here", 3.0)
    store.mark_failed(jobs[1].hash, "ValueError: boom", 4.0)
    assert store.counts() == {"pending": 10, "running": 1, "done": 0, "failed": 1}
    assert store.requeue("running") == 1
    assert store.requeue("failed", [jobs[2].hash]) == 0  # only the named jobs
    assert store.requeue("failed", [jobs[1].hash]) == 1
    assert store.counts()["pending"] == 12
    store.close()


def test_one_driver_per_store(tmp_path):
    sweep_file = write(tmp_path / "s.yaml", TWELVE_JOBS)
    with exclusive(tmp_path / "store"), pytest.raises(UserError, match="another sweep is running"):
        run_sweep(str(sweep_file), SweepRunConfig(store=str(tmp_path / "store"), gpus=0, quiet=True))


def test_failed_jobs_are_recorded_and_retried_on_request(tmp_path):
    # a dataset directory that does not exist: the job fails in its first second
    text = "fixed:\n  data: {dataset: cifar10, data_dir: /nonexistent/cifar}\naxes:\n  rnp.alpha: [0.2]\n"
    sweep_file = write(tmp_path / "fails.yaml", text)
    options = SweepRunConfig(store=str(tmp_path / "store"), gpus=0, quiet=True)
    assert run_sweep(str(sweep_file), options)["failed"] == 1
    [row] = open_existing(tmp_path / "store").rows()
    assert row["status"] == "failed" and "/nonexistent/cifar" in row["error"] and "\n" not in row["error"]
    assert "Traceback" in (tmp_path / "store" / "sweep.log").read_text()  # the details are in the log
    assert run_sweep(str(sweep_file), options)["ran"] == 0  # failed jobs wait for --retry-failed
    options.retry_failed = True
    assert run_sweep(str(sweep_file), options)["ran"] == 1
    assert open_existing(tmp_path / "store").rows()[0]["attempts"] == 2


def test_sweep_with_failed_jobs_exits_1(tmp_path, capsys):
    text = "fixed:\n  data: {dataset: cifar10, data_dir: /nonexistent/cifar}\naxes:\n  rnp.alpha: [0.2]\n"
    sweep_file = write(tmp_path / "fails.yaml", text)
    assert main(["sweep", str(sweep_file), "--store", str(tmp_path / "store"), "--gpus", "0", "--quiet"]) == 1
    assert '"failed": 1' in capsys.readouterr().out


def test_report_on_a_store_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no sweep results here" in capsys.readouterr().err
    (tmp_path / "results.sqlite").write_text("not a database")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not an rnp-fast results store" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def resumed_store(tmp_path_factory):
    """The 12-job sweep, killed with SIGKILL after a few jobs and run again to the end.

    Two worker processes (as the default gives on 2 cores, whatever this machine has), which die
    with the driver: none is left running its job into the store after the kill.
    Returns (store, sweep file, done rows before the kill, summary of the second run)."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_file = write(root / "twelve.yaml", TWELVE_JOBS)
    store = root / "store"
    env = single_threaded_env()
    command = sweep_command(sweep_file, store, "--jobs-per-device", "2")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(done_rows(store)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = done_rows(store)
    assert 3 <= len(before) < 12, "the first run should die mid-sweep"
    workers = {int(row["worker"].split()[0].rsplit(":", 1)[1]) for row in open_existing(store).rows("done")}
    assert 1 <= len(workers) <= 2
    assert wait_until(lambda: not any(alive(pid) for pid in workers), 30), "a worker outlived its driver"
    second = subprocess.run(sweep_command(sweep_file, store), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return store, sweep_file, before, json.loads(second.stdout)


@pytest.mark.heavy
def test_killed_sweep_resumes_without_rerunning_finished_jobs(resumed_store):
    store, sweep_file, before, summary = resumed_store
    assert summary["done"] == 12 and summary["failed"] == 0
    assert summary["ran"] == 12 - len(before)  # the finished jobs were skipped
    connection = sqlite3.connect(store / "results.sqlite")
    rows = connection.execute("SELECT hash, status FROM jobs").fetchall()
    connection.close()
    assert len(rows) == 12 and len({h for h, _ in rows}) == 12  # no duplicates
    assert {status for _, status in rows} == {"done"}
    after = done_rows(store)
    for job_hash, row in before.items():
        assert after[job_hash] == row  # same start and finish times, one attempt: not run again
    for job_hash in after:
        assert (store / "jobs" / job_hash / "pruning.csv").is_file()
        assert not (store / "jobs" / job_hash / "purified.safetensors").exists()  # keep_purified: false
    assert len(list((store / "models").glob("*/model.safetensors"))) == 6  # one model per attack and seed
    files = strict_json_files(store)  # every JSON a sweep writes parses strictly (no NaN, no Infinity)
    summaries = [data for name, data in files.items() if name.startswith("jobs/") and name.endswith("summary.json")]
    assert len(summaries) == 12 and all(s["asr_after_n"] > 0 and s["verdict"] is not None for s in summaries)
    connection = sqlite3.connect(store / "results.sqlite")
    stored = [strict_json(text) for (text,) in connection.execute("SELECT metrics FROM jobs")]
    connection.close()
    assert all(len(m["clean_acc_after_ci95"]) == 2 and m["model_asr_n"] > 0 for m in stored)
    assert not list(store.glob("*/.*.partial-*"))  # no staging directory left by the kill
    log = (store / "sweep.log").read_text()
    assert log.count("done   ") == 12
    # the job running at the kill (if the kill did not fall between two jobs) ran again, once
    [interrupted] = re.findall(r"\((\d+) interrupted earlier", log)[1:]
    retried = [h for h in after if after[h]["attempts"] == 2]
    assert int(interrupted) == len(retried) <= 2 and all(after[h]["attempts"] == 1 for h in before)


@pytest.mark.heavy
def test_finished_sweep_runs_nothing_again(resumed_store):
    store, sweep_file, _, _ = resumed_store
    before = done_rows(store)
    summary = run_sweep(str(sweep_file), SweepRunConfig(store=str(store), gpus=0, quiet=True))
    assert (summary["ran"], summary["done"]) == (0, 12)
    assert done_rows(store) == before


@pytest.mark.heavy
def test_report_writes_table_and_plots(resumed_store, tmp_path, capsys):
    store = resumed_store[0]
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 0
    assert strict_json(capsys.readouterr().out)["rows"] == 6 and strict_json_files(tmp_path / "report")
    table = (tmp_path / "report" / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| attack | arch | rnp.alpha | seeds | clean before | clean after | ASR before")
    assert len(lines) == 2 + 6  # header, rule, 3 attacks x 2 alphas (seeds averaged)
    assert all(" ± " in line for line in lines[2:])
    csv_lines = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("attack,arch,rnp.alpha,seeds,clean_acc_before_mean,clean_acc_before_std")
    assert "asr_after_n,asr_after_ci95_lo,asr_after_ci95_hi" in csv_lines[0]
    assert len(csv_lines) == 7 and all(line.split(",")[3] == "2" for line in csv_lines[1:])
    for attack in ("badnets", "blend", "sig"):
        png = tmp_path / "report" / f"threshold_{attack}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.heavy  # two sweeps of two tiny jobs, one in two worker processes: ~60 s on 2 busy cores
def test_two_workers_give_the_results_of_one_at_a_time_and_share_one_trained_model(tmp_path):
    """--jobs-per-gpu 2 (the old name) without a GPU: two worker processes; both jobs need the same
    model, which is trained once (the second worker waits on the model's lock, then reuses it).
    Every job's results equal those of the same sweep run one job at a time, in this process."""
    sweep_file = write(tmp_path / "two.yaml", TINY_FIXED + "axes:\n  rnp.alpha: [0.2, 0.5]\n")
    store, alone = tmp_path / "store", tmp_path / "alone"
    result = subprocess.run(
        sweep_command(sweep_file, store, "--jobs-per-gpu", "2"),
        env=single_threaded_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = open_existing(store).rows("done")
    assert len(rows) == 2 and len({row["worker"] for row in rows}) == 2  # two processes
    assert sorted(row["timings"]["train"] > 0 for row in rows) == [False, True]  # trained once
    first_line = (store / "sweep.log").read_text().splitlines()[0]
    assert "2 job(s) at once, one torch thread each: as asked (--jobs-per-device 2)" in first_line
    summary = run_sweep(str(sweep_file), SweepRunConfig(store=str(alone), gpus=0, jobs_per_device=1, quiet=True))
    assert summary["backend"] == "local (cpu)" and summary["done"] == 2
    one_at_a_time = {row["hash"]: row for row in open_existing(alone).rows("done")}
    for row in rows:
        assert row["metrics"] == one_at_a_time[row["hash"]]["metrics"]
        masks = [(folder / "jobs" / row["hash"] / "mask_values.txt").read_text() for folder in (store, alone)]
        assert masks[0] == masks[1]


@pytest.mark.heavy
def test_attack_table_checks_the_targets_against_the_clean_baseline(tmp_path):
    """benchmarks/attack_table.py on two tiny sweeps: an attack and its unpoisoned baseline."""
    stores = {}
    for name, attack in (("attacks", "{attack: badnets}"), ("clean", "{attack: badnets, poison: false}")):
        sweep_file = write(tmp_path / f"{name}.yaml", TINY_FIXED + f"  attack: {attack}\naxes:\n  seed: [0]\n")
        stores[name] = tmp_path / name
        run_sweep(str(sweep_file), SweepRunConfig(store=str(stores[name]), gpus=0, quiet=True))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "attack_table.py"
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(script), str(stores["attacks"]), str(stores["clean"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| badnets |" in result.stdout
    table = json.loads(out.read_text())
    [entry] = table["attacks"]
    clean = open_existing(stores["clean"]).rows("done")[0]["metrics"]
    assert clean["model_asr"] <= 0.5  # nothing was poisoned
    assert table["baseline_clean_acc"] == clean["model_clean_acc"]
    assert entry["clean_drop_vs_baseline"] == pytest.approx(clean["model_clean_acc"] - entry["clean_before"])
    assert entry["meets_asr_target"] == (entry["asr_before"] >= 0.90)
    assert table["setup"]["model"]["width"] == TINY_WIDTH and "device" in table
    swapped = subprocess.run(
        [sys.executable, str(script), str(stores["clean"]), str(stores["attacks"])], capture_output=True, text=True
    )
    assert swapped.returncode != 0 and "not a clean baseline" in swapped.stderr


# ----------------------------------------------------------------------------- threads, retries, scratch


def test_thread_count_is_part_of_a_job(tmp_path):
    job = load_sweep(write(tmp_path / "s.yaml", TWELVE_JOBS)).jobs[0]
    assert job.threads == 1
    two = replace(job, threads=2)
    assert two.hash != job.hash and two.train_hash != job.train_hash  # another float order: another job


def test_store_from_before_thread_counts_gains_the_column(tmp_path):
    old_schema = re.sub(r"\n\s*threads\s+INTEGER,[^\n]*", "", SCHEMA)
    assert "threads" not in old_schema
    connection = sqlite3.connect(tmp_path / "results.sqlite")
    connection.execute(old_schema)
    connection.commit()
    connection.close()
    jobs = load_sweep(write(tmp_path / "s.yaml", TWELVE_JOBS)).jobs[:1]
    store = ResultsStore(tmp_path)
    store.add_jobs(jobs, "s", 1.0)
    store.mark_running(jobs[0].hash, "here", 2.0)
    store.add_attempts(jobs[0].hash, 2)  # a backend's own retries
    record = {"metrics": {}, "timings": {}, "device": "cpu", "threads": 1, "versions": {}}
    store.mark_done(jobs[0].hash, {**record, "started_at": 2.0, "finished_at": 3.0})
    [row] = store.rows()
    assert (row["threads"], row["attempts"], row["status"]) == (1, 3, "done")
    store.close()
    connection = sqlite3.connect(tmp_path / "results.sqlite")
    assert connection.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID  # ours from now on
    connection.close()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_results_sqlite_rnp_fast_did_not_create_is_never_opened_for_writing(journal, tmp_path):
    """Another application's database (here: in either journal mode) is inspected read-only and
    immutable: no statement, no migration, no journal, -wal or -shm file; one line says why."""
    database = tmp_path / "results.sqlite"
    connection = sqlite3.connect(database)
    connection.execute(f"PRAGMA journal_mode={journal}")
    with connection:
        connection.execute("CREATE TABLE jobs (hash TEXT, status TEXT, mine TEXT)")  # our table's name, not ours
        connection.execute("INSERT INTO jobs VALUES ('a', 'done', 'precious')")
    connection.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for open_store in (ResultsStore, open_existing):
        with pytest.raises(NotAStore, match="is not an rnp-fast results store"):
            open_store(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_store_says_it_is_rnp_fasts_in_its_header(tmp_path):
    ResultsStore(tmp_path).close()
    header = (tmp_path / "results.sqlite").read_bytes()[68:72]  # SQLite's application id, in the main file
    assert int.from_bytes(header, "big") == APPLICATION_ID
    ResultsStore(tmp_path).close()  # and it opens again


def test_only_dead_tasks_scratch_folders_are_removed(tmp_path, monkeypatch):
    from rnp_fast.sweep import backends

    monkeypatch.setattr(backends.tempfile, "gettempdir", lambda: str(tmp_path))
    host = socket.gethostname()
    dead = dead_pid()
    folders = {
        "dead": f"{SCRATCH_PREFIX}{dead}-{host}-abc_123",
        "alive": f"{SCRATCH_PREFIX}{os.getpid()}-{host}-abc_123",
        "other host": f"{SCRATCH_PREFIX}{dead}-not-{host}-abc_123",
        "not ours": f"{SCRATCH_PREFIX}notes",
        "older name": f"{SCRATCH_PREFIX}k2j4h3",
    }
    for name in folders.values():  # each a killed task's scratch: its job's run folder, complete
        with RunDirectory(tmp_path / name / "job", kind="sweep job") as run:
            run.write_text("summary.json", "{}")
    users = f"{SCRATCH_PREFIX}{dead}-{host}-users_files"  # named like one, holding the user's file
    (tmp_path / users).mkdir()
    (tmp_path / users / "notes.txt").write_text("mine")
    folders["user's"] = users
    (tmp_path / f"{SCRATCH_PREFIX}{dead}-{host}-file").write_text("a file, not a folder")
    backends.remove_dead_scratch()
    left = {p.name for p in tmp_path.iterdir()}
    assert folders["dead"] not in left
    assert left == {*folders.values(), f"{SCRATCH_PREFIX}{dead}-{host}-file"} - {folders["dead"]}
