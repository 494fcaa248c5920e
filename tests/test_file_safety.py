"""rnp-fast never destroys what it did not make, and refuses wrong content, not only wrong syntax.

Every case runs one command inside a sentinel tree (a home folder, a current folder with a
user's files, a non-empty folder of the user's, the inputs, and folders rnp-fast made: an earlier
run the user added files to, a sweep store with a trained model, old-style runs, links) and
asserts: the exit code, one line on stderr without a traceback that says what is wrong, that no
file anywhere in the tree was created, changed or removed (every file hashed before and after),
and that the refusal took under 5 seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests_support import TINY_WIDTH, dead_pid

from rnp_fast.cli import main
from rnp_fast.models import build_model
from rnp_fast.outputs import MARKER, OutputError, RunDirectory
from rnp_fast.outputs.leftovers import clean_up_after_killed_runs
from rnp_fast.outputs.markers import MARKER_BEING_WRITTEN, mark, read_marker, record_of, write_marker
from rnp_fast.prune import Channel, batchnorm_sizes
from rnp_fast.report import format_mask_values
from rnp_fast.sweep.store import ResultsStore

DIGITS = ["--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]
SHORT = ["--ratio", "0.1", "--batch-size", "32", "--unlearning-epochs", "0", "--recovering-epochs", "1"]
SHORT += ["--allow-small-holdout"]  # 12 held-out images: tiny data
SWEEP = "name: s\nfixed: {data: {dataset: digits}, model: {width: 0.125}}\n"
# A sweep whose jobs the threshold rule can judge (enough held-out images): refused only for what a case adds
RUNNABLE_SWEEP = "name: s\nfixed: {data: {dataset: digits, ratio: 0.3, holdout: 0.3}, model: {width: 0.125}}\n"


def tiny_masks() -> list[Channel]:
    sizes = batchnorm_sizes(build_model("resnet18", 10, TINY_WIDTH))
    return [Channel(layer, i, 0.5) for layer, count in sizes.items() for i in range(count)]


def write_mask_variants(folder: Path) -> None:
    channels = tiny_masks()
    text = format_mask_values(channels)
    lines = text.splitlines(keepends=True)
    (folder / "nan.txt").write_text(text.replace("0.5000", "nan", 1))
    (folder / "negative.txt").write_text(lines[0] + lines[1].replace("0.5000", "-5") + "".join(lines[2:]))
    (folder / "half.txt").write_text("".join(lines[: 1 + len(channels) // 2]))
    (folder / "duplicated.txt").write_text(text + lines[5])
    (folder / "extra_columns.txt").write_text(lines[0] + lines[1].rstrip() + " \t 7\n" + "".join(lines[2:]))
    (folder / "masks_dir").mkdir()


def write_bad_checkpoints(folder: Path) -> None:
    torch.manual_seed(0)
    state = build_model("resnet18", 10, TINY_WIDTH).state_dict()
    for dtype in (torch.int32, torch.bool, torch.complex64):
        broken = dict(state, **{"layer1.0.bn1.weight": state["layer1.0.bn1.weight"].to(dtype)})
        torch.save(broken, folder / f"{str(dtype).removeprefix('torch.')}.pth")


def write_sweep_files(folder: Path) -> None:
    thousand = "[" + ", ".join(str(i) for i in range(100)) + "]"
    (folder / "million.yaml").write_text(
        SWEEP + f"axes: {{seed: {thousand}, rnp.alpha: {thousand}, rnp.unlearning_lr: {thousand}}}\n"
    )
    (folder / "huge.yaml").write_text(SWEEP + "# padding\n" * 120_000)
    (folder / "small.yaml").write_text(SWEEP + "axes: {seed: [0]}\n")


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A YAML list of ``levels`` levels of aliases ``width`` wide: a few hundred bytes, width**levels leaves."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        anchors.append(f"&a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "[" + ", ".join(anchors) + "]"


def write_hostile_sweep_files(folder: Path) -> None:
    bomb = alias_bomb()
    fixed = "name: s\nfixed:\n  data: {dataset: digits}\n"
    (folder / "bomb_attack_param.yaml").write_text(fixed + f"  attack: {{attack_param: {bomb}}}\n")
    (folder / "bomb_blend_alpha.yaml").write_text(fixed + f"  trigger: {{blend: {{alpha: {bomb}}}}}\n")
    (folder / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000)  # JSON (and YAML) nested 100,000 deep
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "probe.json").write_text('{"made_by": "rnp-fast", "kind": "probe result", "sections": {}}')


def our_folder(path: Path, kind: str | None, files: dict[str, str], listed: bool = True) -> Path:
    """A folder as rnp-fast leaves it: its files and a marker (``listed``: as now, proving each file;
    else as before markers listed files: at most the kind)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    if listed:
        mark(path, kind, files)
    else:
        (path / MARKER).write_text(
            json.dumps({"made_by": "rnp-fast", "version": "0.1.0", **({"kind": kind} if kind else {})})
        )
    return path


# What rnp-fast writes under these names, as far as an old marker's content checks look (old_markers)
RUN_FILES = {
    "summary.json": json.dumps({"clean_acc_before": 0.9, "asr_before": 1.0, "pruning_by": "threshold", "rule": "r"}),
    "mask_values.txt": "No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t bn1 \t 0 \t 0.5000\n",
}
MODEL_FILES = {
    "model.safetensors": "weights",
    "model.pth": "weights",
    "train.log": "[2026/01/01 00:00:00] - log",
    "summary.json": '{"versions": {"rnp_fast": "0.1.0"}}',
}


def write_rnp_folders(w: Path) -> None:
    """Folders rnp-fast made, some holding the user's files, and links the user made."""
    prev = our_folder(w / "prev", "defense run", RUN_FILES)
    (prev / "NOTES.txt").write_text("what I saw in this run")
    (prev / "mine").mkdir()
    (prev / "mine" / "z.txt").write_text("derived")
    our_folder(w / "store" / "models" / "abc123", "trained model", MODEL_FILES)
    our_folder(w / "store" / "jobs" / "j1", "defense run", RUN_FILES)
    ResultsStore(w / "store2").close()
    our_folder(w / "store2", "sweep store", {}, listed=False)
    old = our_folder(w / "old-run", "defense run", {**RUN_FILES, "pruning.csv": "step,label,pruned,x\n"}, listed=False)
    (old / "my_plot.svg").write_text("<svg/>")
    unknown = our_folder(w / "older-run", None, RUN_FILES, listed=False)
    (unknown / "notes.md").write_text("# mine")
    os.symlink(w / "cwd" / "photos", our_folder(w / "linked-run", "defense run", RUN_FILES) / "photos")
    os.link(w / "cwd" / "thesis.tex", our_folder(w / "hardlinked-run", "defense run", RUN_FILES) / "thesis.tex")
    read_only = our_folder(w / "read-only-run", "defense run", RUN_FILES)
    read_only.chmod(0o555)
    our_folder(w / "holder" / "st", "sweep store", {}, listed=False)
    our_folder(our_folder(w / "run-holding-store", "defense run", RUN_FILES) / "st", "sweep store", {}, listed=False)
    os.symlink(w / "v", w / "link-to-v")
    os.symlink(w / "home", w / "link-to-home")
    os.symlink(w / "store" / "models", w / "link-to-models")


def user_folder(path: Path, files: dict[str, str], marker: str | dict | None = None) -> Path:
    """The user's folder, with their files and (a forged or damaged) ``.rnp-fast`` beside them."""
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_text(content)
    if marker is not None:
        (path / MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return path


def user_database(path: Path, sql: str = "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)") -> None:
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(sql)
        if sql.startswith("CREATE TABLE photos"):
            connection.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    connection.close()


def write_forged_markers(w: Path) -> None:
    """Markers that claim what rnp-fast cannot prove (issue 29), next to the user's own files."""
    precious = {"notes.txt": "precious"}
    run = {"made_by": "rnp-fast", "kind": "defense run"}
    user_folder(w / "forged-list", precious, {**run, "files": ["notes.txt"]})
    stale = {"size": len("precious"), "sha256": "0" * 64}
    user_folder(w / "forged-hash", precious, {**run, "format": 2, "files": {"notes.txt": stale}})
    user_folder(w / "damaged", {"summary.json": '{"mine": 1}', "output.log": "my log"}, "{not json")
    user_folder(w / "marker-list", precious, "[1, 2, 3]")
    user_folder(w / "marker-foreign", precious, {"made_by": "someone else", "kind": "defense run"})
    user_folder(w / "marker-kind", precious, {**run, "format": 2, "kind": "photo album", "files": {}})
    user_folder(w / "marker-format", precious, {**run, "format": 3, "files": {}})
    user_folder(w / "marker-huge", precious, json.dumps(run) + " " * 1_100_000)
    outside = {"../v/keep": record_of(w / "v" / "keep").as_dict()}  # a true proof, of a file outside
    user_folder(w / "marker-outside", precious, {**run, "format": 2, "files": outside})
    user_folder(w / "marker-absolute", precious, {**run, "files": ["/etc/hostname", "notes.txt"]})
    os.symlink(w / "damaged" / MARKER, user_folder(w / "marker-link", precious) / MARKER)
    (user_folder(w / "marker-dir", precious) / MARKER).mkdir()
    user_database(w / "user-db" / "results.sqlite")
    user_database(
        user_folder(w / "user-db-marked", {}, {"made_by": "rnp-fast", "kind": "sweep store"}) / "results.sqlite"
    )
    user_folder(w / "not-sqlite", {"results.sqlite": "name,size\ncat.jpg,3\n"})
    user_database(w / "other-jobs" / "results.sqlite", "CREATE TABLE jobs (id INTEGER PRIMARY KEY, title TEXT)")


def write_count_sweep_files(folder: Path) -> None:
    """Sweep files with a key given twice, or a count no machine would finish."""
    (folder / "dup_seed.yaml").write_text(SWEEP + "axes:\n  seed: [0, 1]\n  rnp.alpha: [0.2]\n  seed: [2]\n")
    (folder / "dup_name.yaml").write_text("name: a\n" + SWEEP + "axes: {seed: [0]}\n")
    huge = "name: s\nfixed:\n  data: {dataset: digits}\n  train: {epochs: 1000000000}\naxes: {seed: [0]}\n"
    (folder / "huge_epochs.yaml").write_text(huge)
    (folder / "huge_axis.yaml").write_text(RUNNABLE_SWEEP + "axes: {rnp.recovering_epochs: [1, 100000000000]}\n")
    (folder / "tiny_step.yaml").write_text(RUNNABLE_SWEEP + "axes: {rnp.pruning_step: [0.05, 0.000000001]}\n")


@pytest.fixture
def world(tmp_path, tiny_checkpoint, monkeypatch):
    """The sentinel tree; the test runs with its ``cwd`` as the current folder and ``home`` as HOME."""
    home, cwd, inputs = tmp_path / "home", tmp_path / "cwd", tmp_path / "inputs"
    for folder in (home, cwd / "photos", inputs, tmp_path / "v", tmp_path / "empty"):
        folder.mkdir(parents=True)
    (home / "notes.txt").write_text("my notes")
    (cwd / "thesis.tex").write_text("\\documentclass{article}")
    (cwd / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "v" / "keep").write_text("x")
    shutil.copy(tiny_checkpoint, inputs / "model.safetensors")
    write_mask_variants(inputs)
    write_bad_checkpoints(inputs)
    write_sweep_files(inputs)
    write_hostile_sweep_files(inputs)
    store = tmp_path / "store"
    ResultsStore(store).close()
    (store / MARKER).write_text('{"made_by": "rnp-fast"}')
    write_rnp_folders(tmp_path)
    write_forged_markers(tmp_path)
    write_count_sweep_files(inputs)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    yield tmp_path
    (tmp_path / "read-only-run").chmod(0o755)  # so that the tree can be removed


def defend(*extra: str, out: str = "{w}/new-run") -> list[str]:
    return ["defend", "--model", "{w}/inputs/model.safetensors", "--out", out, *DIGITS, *SHORT, *extra]


def with_mask(name: str) -> list[str]:
    return defend("--mask-file", f"{{w}}/inputs/{name}")


def with_model(name: str) -> list[str]:
    return ["defend", "--model", f"{{w}}/inputs/{name}", "--out", "{w}/new-run", *DIGITS, "--allow-small-holdout"]


# name -> (argv, with {w} for the sentinel tree, the text its one line must hold)
CASES = {
    # output ownership: nothing that rnp-fast did not make is replaced
    "demo into a user's folder": (["demo", "--out", "{w}/v"], "was not made by rnp-fast"),
    "demo into the current folder": (["demo", "--out", "."], "current folder"),
    "demo into the empty string": (["demo", "--out", ""], "--out is empty"),
    "demo into the home folder": (["demo", "--out", "~"], "home folder"),
    "demo into the root folder": (["demo", "--out", "/"], "root folder"),
    "demo into a folder above the current one": (["demo", "--out", ".."], "current folder or one above"),
    "defend into a user's folder": (defend(out="{w}/v"), "was not made by rnp-fast"),
    "defend into the folder holding the model": (defend(out="{w}/inputs"), "which this command reads"),
    "defend into an existing file": (defend(out="{w}/v/keep"), "exists and is not a directory"),
    "defend into a name too long": (defend(out="{w}/" + "n" * 300), "File name too long"),
    "train-backdoor into a user's folder": (
        ["train-backdoor", "--out", "{w}/v", *DIGITS, "--epochs", "1"],
        "was not made by rnp-fast",
    ),
    "report into a user's folder": (["report", "{w}/store", "--out", "{w}/v"], "was not made by rnp-fast"),
    "report into the store itself": (["report", "{w}/store", "--out", "{w}/store"], "which this command reads"),
    "report into the current folder": (["report", "{w}/store", "--out", "."], "current folder"),
    "sweep into a user's folder": (["sweep", "{w}/inputs/small.yaml", "--store", "{w}/v"], "was not made by rnp-fast"),
    "sweep into the folder holding its file": (
        ["sweep", "{w}/inputs/small.yaml", "--store", "{w}/inputs"],
        "which this command reads",
    ),
    "bench onto a user's file, before the work": (["bench", "--out", "{w}/home/notes.txt"], "was not made by rnp-fast"),
    "bench onto a folder, before the work": (["bench", "--out", "{w}/empty"], "is a directory"),
    "bench onto the empty string": (["bench", "--out", ""], "--out is empty"),
    # mask files must list every BatchNorm channel once, each value finite and in [0, 1]
    "mask file with NaN": (with_mask("nan.txt"), "line 2: mask value nan is not a number in [0, 1]"),
    "mask file with -5": (with_mask("negative.txt"), "line 2: mask value -5 is not a number in [0, 1]"),
    "mask file missing half its rows": (with_mask("half.txt"), "lists 300 of the model's 600 BatchNorm channels"),
    "mask file with a duplicated row": (with_mask("duplicated.txt"), "line 602: channel bn1[4] is listed twice"),
    "mask file with extra columns": (with_mask("extra_columns.txt"), "line 2: expected 4 columns"),
    "mask file that is a folder": (with_mask("masks_dir"), "is a directory"),
    # checkpoints: floating-point weights stored as other types are refused, not cast
    "checkpoint with int32 weights": (with_model("int32.pth"), "layer1.0.bn1.weight is stored as int32"),
    "checkpoint with bool weights": (with_model("bool.pth"), "layer1.0.bn1.weight is stored as bool"),
    "checkpoint with complex weights": (with_model("complex64.pth"), "layer1.0.bn1.weight is stored as complex64"),
    "model that is a folder": (with_model(""), "is a directory"),
    # data and sweeps
    "holdout that leaves too few images": (defend("--holdout", "0.99"), "--holdout 0.99 holds"),
    "sweep of a million jobs": (["sweep", "{w}/inputs/million.yaml", "--store", "{w}/s"], "1,000,000 jobs"),
    "sweep file over 1 MB": (["sweep", "{w}/inputs/huge.yaml", "--store", "{w}/s"], "at most 1,000,000"),
}


def report_into(out: str) -> list[str]:
    return ["report", "{w}/store", "--out", out]


def train_into(out: str) -> list[str]:
    return ["train-backdoor", "--out", out, *DIGITS, "--epochs", "1"]


def sweep_of(name: str, store: str = "{w}/s") -> list[str]:
    return ["sweep", f"{{w}}/inputs/{name}", "--store", store]


ALIASES = "aliases (*a0) are not allowed"
NOT_A_STORE = "is a defense run made by rnp-fast, not a sweep store"

# Refused before anything is loaded: each within 5 seconds (issue 23).
QUICK_CASES = {
    # issue 23, cases 1-4: users' files inside rnp-fast's folders, kinds, and YAML alias bombs
    "defend into an earlier run holding the user's files": (
        defend(out="{w}/prev"),
        "prev/NOTES.txt was not written by rnp-fast; move your files out of",
    ),
    "defend onto a sweep store": (defend(out="{w}/store"), "is a sweep store made by rnp-fast, not a defense run"),
    "report into a trained model inside the store": (
        report_into("{w}/store/models/abc123"),
        "is a trained model made by rnp-fast, not a sweep report",
    ),
    "sweep with an alias bomb in fixed.attack.attack_param": (sweep_of("bomb_attack_param.yaml"), ALIASES),
    "sweep with an alias bomb in fixed.trigger.blend.alpha": (sweep_of("bomb_blend_alpha.yaml"), ALIASES),
    # links, ancestors, nesting and kinds
    "defend through a link to a user's folder": (defend(out="{w}/link-to-v"), "was not made by rnp-fast"),
    "demo through a link to the home folder": (["demo", "--out", "{w}/link-to-home"], "home folder"),
    "defend through a link into a sweep store": (defend(out="{w}/link-to-models/new"), "lies inside"),
    "defend into a user's folder holding a store": (defend(out="{w}/holder"), "was not made by rnp-fast"),
    "defend into a run the user put a store in": (defend(out="{w}/run-holding-store"), "st/ was not written"),
    "defend into a run holding the user's link": (defend(out="{w}/linked-run"), "photos was not written"),
    "defend into a run holding a hard link to the user's file": (defend(out="{w}/hardlinked-run"), "thesis.tex was"),
    "defend into a run the user made read-only": (defend(out="{w}/read-only-run"), "is read-only"),
    "defend into an old-style run holding the user's plot": (defend(out="{w}/old-run"), "my_plot.svg was not"),
    "defend into an old run whose marker has no kind": (defend(out="{w}/older-run"), "notes.md was not written"),
    "train-backdoor over a defense run": (train_into("{w}/prev"), "is a defense run made by rnp-fast, not a trained"),
    "train-backdoor over the store's own trained model": (train_into("{w}/store/models/abc123"), "lies inside"),
    "sweep --store onto a job inside a store": (sweep_of("small.yaml", "{w}/store/jobs/j1"), NOT_A_STORE),
    "sweep --store onto a run outside a store": (sweep_of("small.yaml", "{w}/hardlinked-run"), NOT_A_STORE),
    "report of one store into another store's report": (report_into("{w}/store2/report"), "lies inside"),
    "demo into a sweep job's folder": (["demo", "--out", "{w}/store/jobs/j1"], "lies inside"),
    "bench result inside a run": (["bench", "--out", "{w}/prev/bench.json"], "lies inside"),
    "sweep file nested 100,000 deep": (sweep_of("deep.yaml"), "nested more than 64 deep"),
    "bench onto a GPU probe's result": (["bench", "--out", "{w}/inputs/probe.json"], "is a probe result made by"),
    "bench onto the user's JSON nested 100,000 deep": (["bench", "--out", "{w}/inputs/deep.json"], "was not made by"),
}

NOT_PROVEN = "cannot tell its files from yours"
NOT_A_RESULTS_STORE = "is not an rnp-fast results store"

# Issue 29: a marker is a claim, not a proof; stores, counts and duplicate keys. Each within 5 s.
HOSTILE_CASES = {
    "defend into a folder whose marker lists the user's file": (
        defend(out="{w}/forged-list"),
        "forged-list/notes.txt was not written by rnp-fast",
    ),
    "defend into a folder whose marker's proof does not match": (
        defend(out="{w}/forged-hash"),
        "forged-hash/notes.txt changed since rnp-fast wrote it",
    ),
    "defend into a damaged marker beside the user's summary.json": (defend(out="{w}/damaged"), "is damaged (not JSON)"),
    "demo into a marker that is a JSON list": (["demo", "--out", "{w}/marker-list"], "is not an rnp-fast marker"),
    "defend into another tool's marker": (defend(out="{w}/marker-foreign"), "is not an rnp-fast marker"),
    "defend into a marker of an unknown kind": (defend(out="{w}/marker-kind"), "names an unknown kind of folder"),
    "defend into a marker of a newer format": (defend(out="{w}/marker-format"), "has format 3"),
    "defend into an oversized marker": (defend(out="{w}/marker-huge"), "far more than a marker rnp-fast writes"),
    "defend into a marker proving a file outside its folder": (
        defend(out="{w}/marker-outside"),
        "lists '../v/keep', a path outside its folder",
    ),
    "defend into an old marker listing an absolute path": (
        defend(out="{w}/marker-absolute"),
        "lists '/etc/hostname', a path outside its folder",
    ),
    "defend into a marker that is a link": (defend(out="{w}/marker-link"), "is not a file rnp-fast wrote"),
    "train-backdoor into a marker that is a folder": (train_into("{w}/marker-dir"), "is not a file rnp-fast wrote"),
    "report into a damaged marker's folder": (report_into("{w}/damaged"), NOT_PROVEN),
    "defend inside a folder whose marker is damaged": (
        defend(out="{w}/damaged/sub"),
        "whose rnp-fast marker is damaged",
    ),
    "sweep into the user's folder holding their results.sqlite": (
        sweep_of("small.yaml", "{w}/user-db"),
        "was not made",
    ),
    "sweep into a forged store marker over the user's database": (
        sweep_of("small.yaml", "{w}/user-db-marked"),
        NOT_A_RESULTS_STORE,
    ),
    "sweep into a store whose results.sqlite is not SQLite": (
        sweep_of("small.yaml", "{w}/not-sqlite"),
        "was not made by rnp-fast",
    ),
    "sweep into another application's jobs table": (sweep_of("small.yaml", "{w}/other-jobs"), "was not made by"),
    "report of the user's database": (["report", "{w}/user-db-marked"], NOT_A_RESULTS_STORE),
    # counts, checked before anything is built from them
    "defend --repeats 1000000000": (defend("--repeats", "1000000000"), "--repeats must be in 1..10,000"),
    "demo --repeats 1000000000": (["demo", "--out", "{w}/d", "--repeats", "1000000000"], "--repeats must be in"),
    "defend --repeats 2 with a mask file": (
        defend("--repeats", "2", "--mask-file", "{w}/inputs/half.txt"),
        "--repeats with --mask-file: the masks are fixed",
    ),
    "defend --unlearning-epochs 10**9": (defend("--unlearning-epochs", "1000000000"), "--unlearning-epochs must be"),
    "defend --recovering-epochs 10**12": (defend("--recovering-epochs", str(10**12)), "--recovering-epochs must be"),
    "defend --pruning-step 1e-9": (defend("--pruning-step", "1e-9"), "more than 10,000 pruning candidates"),
    "defend --batch-size 10**12": (defend("--batch-size", str(10**12)), "--batch-size must be in"),
    "train-backdoor --epochs 10**9": (train_into("{w}/t") + ["--epochs", "1000000000"], "--epochs must be in"),
    "bench --repeats 10**9": (["bench", "--repeats", "1000000000"], "--repeats must be in"),
    "sweep --max-jobs 10**12": (sweep_of("small.yaml") + ["--max-jobs", str(10**12)], "--max-jobs must be in"),
    "sweep --jobs-per-gpu 10**6": (sweep_of("small.yaml") + ["--jobs-per-gpu", "1000000"], "--jobs-per-device must be"),
    "sweep file with a billion training epochs": (sweep_of("huge_epochs.yaml"), "epochs must be in 1..10,000"),
    "sweep axis with 10**11 recovering epochs": (sweep_of("huge_axis.yaml"), "recovering-epochs must be in"),
    "sweep axis with a pruning step of 1e-9": (sweep_of("tiny_step.yaml"), "more than 10,000 pruning candidates"),
    # a key given twice in a sweep file (YAML keeps the last one silently)
    "sweep file giving seed twice under axes": (
        sweep_of("dup_seed.yaml"),
        "line 6: duplicate key 'seed' (first given at line 4)",
    ),
    "sweep file giving name twice": (sweep_of("dup_name.yaml"), "line 2: duplicate key 'name' (first given at line 1)"),
}
QUICK_CASES.update(HOSTILE_CASES)
CASES.update(QUICK_CASES)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, folder and link under ``root``: path -> content hash ('dir', or the link's target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"link to {os.readlink(path)}"
        else:
            found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_nothing_touched(case, world, capsys):
    argv, expected = CASES[case]
    before = tree_digest(world)
    started = time.perf_counter()
    code, err = run_cli([arg.replace("{w}", str(world)) for arg in argv], capsys)
    seconds = time.perf_counter() - started
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected.replace("{w}", str(world)) in lines[0], lines[0]
    assert tree_digest(world) == before, "a file outside the run's own directory changed"
    assert case not in QUICK_CASES or seconds < 5, f"{seconds:.1f} s to refuse"


def test_the_table_covers_at_least_20_cases():
    assert len(CASES) >= 20 and len(QUICK_CASES) >= 5 + 10  # issue 23's cases and ten more of their kind
    assert len(HOSTILE_CASES) >= 6 + 20  # issue 29's cases and twenty more of their kind


def test_rerun_replaces_our_own_run_atomically_and_holdout_0_says_where_the_threshold_came_from(world, capsys):
    """--holdout 0 chooses on the training images and says so; a rerun replaces our own run, also
    the files only an earlier run wrote; a hard link the user made to one of its files keeps its
    content; a --batch-size beyond the defense images is said, with the batch size used."""
    out = world / "run"
    argv = [a.replace("{w}", str(world)) for a in defend("--holdout", "0", out=str(out))]
    assert run_cli(argv, capsys)[0] == 0
    summary = (out / "summary.json").read_text()
    assert '"rule_data": "training images"' in summary and "on the training images" in summary
    assert "threshold is chosen on the training images" in (out / "output.log").read_text()
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "defense run" and {"summary.json", "purified.safetensors"} <= set(marker["files"])
    (out / "stale.txt").write_text("from the first run")  # a file an earlier version wrote, and listed
    stale = record_of(out / "stale.txt").as_dict()
    (out / MARKER).write_text(json.dumps({**marker, "files": {**marker["files"], "stale.txt": stale}}))
    os.link(out / "summary.json", world / "home" / "kept-summary.json")
    before = tree_digest(world / "cwd")
    assert run_cli(argv + ["--threshold", "0.5", "--batch-size", "100000"], capsys)[0] == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()  # replaced as a whole
    assert tree_digest(world / "cwd") == before
    assert [p.name for p in world.iterdir() if p.name.startswith(".run.")] == []
    assert (world / "home" / "kept-summary.json").read_text() == summary
    rerun_summary = json.loads((out / "summary.json").read_text())
    log = (out / "output.log").read_text()
    assert "--batch-size 100000 >" in log and "defense images: batches of" in log, log
    assert rerun_summary["threshold"] == 0.5


def test_users_files_make_a_rerun_refuse_and_moving_them_out_lets_it_replace(world, capsys):
    """The rule for files inside rnp-fast's folders (README, "Your files are safe"): rnp-fast
    replaces a folder only as a whole, so it refuses while the user's files are in it, naming the
    first; once they are moved out, the same command replaces the run."""
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(world / "prev"))]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "prev/NOTES.txt was not written by rnp-fast" in err, err
    shutil.move(world / "prev" / "NOTES.txt", world / "v" / "NOTES.txt")
    code, err = run_cli(argv, capsys)
    assert code == 2 and "prev/mine/ was not written by rnp-fast" in err, err
    shutil.move(world / "prev" / "mine", world / "v" / "mine")
    assert run_cli(argv, capsys)[0] == 0
    assert (world / "prev" / "purified.safetensors").is_file()
    assert (world / "v" / "NOTES.txt").read_text() == "what I saw in this run"


def test_an_old_marker_without_a_file_list_is_replaced_when_its_files_are_what_rnp_fast_writes(tmp_path):
    """Format 1 proves nothing: each file must bear rnp-fast's name and look like what it writes."""
    table = "No \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC\n"
    old = our_folder(tmp_path / "old", "run", {**RUN_FILES, "pruning_by_threshold.txt": table}, listed=False)
    with RunDirectory(old) as run:
        run.write_text("summary.json", '{"new": 1}')
    assert sorted(p.name for p in old.iterdir()) == [MARKER, "summary.json"]
    marker = json.loads((old / MARKER).read_text())
    assert marker["format"] == 2 and marker["files"] == {"summary.json": record_of(old / "summary.json").as_dict()}
    mimic = our_folder(tmp_path / "mimic", "run", {**RUN_FILES, "pruning_by_threshold.txt": "my own table"}, False)
    with pytest.raises(OutputError, match="mimic/pruning_by_threshold.txt was not written by rnp-fast"):
        RunDirectory(mimic)


def test_a_file_the_user_adds_during_the_run_stops_the_swap(tmp_path):
    """Exit 1, one line naming it; the previous result and the user's file stay; no staging left."""
    target = tmp_path / "run"
    with RunDirectory(target) as run:
        run.write_text("summary.json", "{}")
    previous = tree_digest(target)
    with pytest.raises(OutputError) as refused, RunDirectory(target) as run:
        run.write_text("summary.json", '{"new": 1}')
        (target / "notes.txt").write_text("mine")
    assert refused.value.exit_code == 1 and "notes.txt appeared or changed during the run" in str(refused.value)
    assert tree_digest(target) == {**previous, "notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_second_command_into_an_output_being_written_is_refused(world, capsys):
    """Two commands racing into one --out: while one writes (it holds its staging folder's lock),
    the other exits 2 with one line, touching nothing; after it, the output is the first's."""
    target = world / "raced"
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(target))]
    with RunDirectory(target) as first:
        first.write_text("summary.json", '{"first": 1}')
        before = tree_digest(world)
        code, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is writing {target} now" in err, err
        assert tree_digest(world) == before
    assert json.loads((target / "summary.json").read_text()) == {"first": 1}


def race_writer(target: str, label: str, hold: float, queue) -> None:
    """One of two processes writing the same target (forked: no interpreter start-up)."""
    try:
        with RunDirectory(target) as run:
            run.write_text("who.txt", label)
            time.sleep(hold)
        queue.put((label, "done"))
    except OutputError as error:
        queue.put((label, str(error)))


def test_two_processes_racing_into_one_output_leave_one_complete_result(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    target = str(tmp_path / "out")
    first = context.Process(target=race_writer, args=(target, "first", 1.5, queue))
    first.start()
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = context.Process(target=race_writer, args=(target, "second", 0.0, queue))
    second.start()
    for process in (first, second):
        process.join(30)
    outcomes = dict(queue.get(timeout=5) for _ in range(2))
    assert outcomes["first"] == "done"
    assert "another rnp-fast command" in outcomes["second"] and "is writing" in outcomes["second"]
    assert (tmp_path / "out" / "who.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_a_fine_output(world, capsys):
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(world / "empty"))]
    assert run_cli(argv, capsys)[0] == 0
    assert (world / "empty" / "summary.json").is_file() and (world / "empty" / MARKER).is_file()


def test_an_os_error_mid_run_is_one_line_exit_1_and_keeps_the_previous_result(world, capsys, monkeypatch):
    out = world / "run"
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(out))]
    assert run_cli(argv, capsys)[0] == 0
    previous = tree_digest(out)

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("rnp_fast.defense.plot_pruning", disk_full)
    code, err = run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err
    assert tree_digest(out) == previous
    assert [p.name for p in world.iterdir() if p.name.startswith(".run.")] == []  # staging removed


def test_safetensors_disk_full_is_one_line_exit_1_and_keeps_the_previous_result(world, capsys, monkeypatch):
    """The disk fills while purified.safetensors is written: one line, exit 1, the old result kept."""
    import builtins

    out = our_folder(world / "run", "defense run", RUN_FILES)  # an earlier run's result
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(out))]
    previous = tree_digest(out)

    def disk_full(path, mode="r", *args, **kwargs):
        if str(path).endswith(".safetensors") and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr("rnp_fast.checkpoint.open", disk_full, raising=False)
    code, err = run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {out}/purified.safetensors: No space left on device" in err, err
    assert tree_digest(out) == previous
    assert [p.name for p in world.iterdir() if p.name.startswith(".run.")] == []


@pytest.mark.parametrize("writer", ["save_reference_checkpoint", "save_safetensors"])
def test_a_full_disk_under_a_checkpoint_writer_is_an_os_error(writer, tmp_path):
    """torch's own writer reports a failed write as RuntimeError('unexpected pos ...'), safetensors'
    as its SafetensorError; ours as OSError."""
    import rnp_fast.checkpoint

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as failed:
        getattr(rnp_fast.checkpoint, writer)({"w": torch.zeros(100_000)}, Path("/dev/full"))
    assert failed.value.errno == 28


def test_sigterm_is_handled_like_ctrl_c(world, tmp_path):
    """Exit 143, one line, the staging folder removed, no previous result touched."""
    out = world / "terminated"
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(out))]
    argv[argv.index("--recovering-epochs") + 1] = "200"  # long enough to be stopped midway
    process = subprocess.Popen(
        [sys.executable, "-m", "rnp_fast", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".terminated.partial-") for p in world.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines() == ["rnp-fast: terminated (SIGTERM); nothing was replaced"], err
    assert not out.exists() and [p.name for p in world.iterdir() if p.name.startswith(".terminated.")] == []


def test_the_mask_checks_accept_the_references_published_file(reference_file):
    from rnp_fast.report import read_mask_file

    sizes = batchnorm_sizes(build_model("resnet18", 10))
    channels = read_mask_file(reference_file("mask_values.txt"), sizes)
    assert len(channels) == 4800 and all(0 <= c.value <= 1 and math.isfinite(c.value) for c in channels)


def test_an_error_line_looks_at_a_bounded_part_of_any_value():
    """What the alias bomb reached before aliases were refused: check_value's message repr'd the
    whole value (9**10 leaves, shared). Now it looks at a few items, for any value, in no time."""
    from rnp_fast.sweep.spec import SweepFileError, check_value

    bomb = ["x"] * 9
    for _ in range(9):
        bomb = [bomb] * 9
    for path, value in (("attack.attack_param", bomb), ("attack.attack", "x" * 500_000)):
        started = time.perf_counter()
        with pytest.raises(SweepFileError) as refused:
            check_value(path, value, "s.yaml", f"fixed.{path}")
        assert time.perf_counter() - started < 1 and len(str(refused.value)) < 300, str(refused.value)[:400]


def test_only_leftovers_proven_ours_are_removed_or_put_back(tmp_path):
    """Killed runs' staging and set-aside folders are removed (or put back) only when their marker
    proves every entry and their writer is gone; folders merely named like them are left alone,
    whatever they hold (issue 29)."""
    pid, target = dead_pid(), tmp_path / "run"
    ours = tmp_path / f".run.partial-{pid}-ours"  # a killed run's staging folder, mid-write
    with RunDirectory(tmp_path / "donor") as donor:
        donor.write_text("summary.json", "{}")
        shutil.copytree(donor.staging, ours)
    user_files = {
        f".run.partial-{pid}-mine": {"notes.txt": "mine"},  # named like staging, no marker
        f".run.old-{pid}-mine": {"previous/notes.txt": "mine"},  # named like a set-aside result
        f".run.old-{pid}-forged": {"previous/summary.json": "{}", "previous/.rnp-fast": "{broken"},
        f".other.partial-{pid}-extra": {"data.csv": "1,2"},
    }
    for folder, files in user_files.items():
        for name, content in files.items():
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / name).write_text(content)
    (ours / "notes.txt").write_text("dropped into our staging folder by the user")
    before = tree_digest(tmp_path)
    with RunDirectory(target) as run:
        run.write_text("summary.json", '{"new": 1}')
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("run", "donor"))} == {
        k: v for k, v in before.items() if not k.startswith(("run", "donor"))
    }
    (ours / "notes.txt").unlink()  # now it holds only what the run announced: proven, removed
    set_aside = tmp_path / f".run.old-{pid}-ours"
    shutil.move(target, set_aside / "previous")  # a run killed mid-swap: the result set aside, no target
    clean_up_after_killed_runs(tmp_path)  # what a sweep does for its jobs/ and models/
    assert not ours.exists() and not set_aside.exists()
    assert json.loads((target / "summary.json").read_text()) == {"new": 1}  # put back
    user_paths = {k: v for k, v in tree_digest(tmp_path).items() if k.startswith(tuple(user_files))}
    assert user_paths == {k: v for k, v in before.items() if k.startswith(tuple(user_files))}


KILLED_WRITER = """
import sys
from rnp_fast.outputs import RunDirectory
run = RunDirectory(sys.argv[1]).__enter__()
print("ready", flush=True)
for i in range(1_000_000):
    run.write_text(f"part{i}.txt", "x")  # each name is announced in the staging marker first
"""


def test_a_run_killed_at_any_moment_leaves_a_marker_that_proves_its_leftover(tmp_path):
    """The staging marker is rewritten before every file a run writes. A kill in the middle of that
    rewrite used to leave it empty, and the folder then stayed forever (an empty marker proves
    nothing): 12 of 30 kills did. A marker is now replaced atomically: 20 kills at random moments,
    the marker always reads, and every leftover is removed by the next run's clean-up."""
    rng = random.Random(0)
    for _ in range(20):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "run")], stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.1))
        writer.kill()
        writer.wait()
        writer.stdout.close()
        [leftover] = tmp_path.iterdir()
        assert read_marker(leftover).staging
        clean_up_after_killed_runs(tmp_path, "run")
        assert not list(tmp_path.iterdir())


def test_a_marker_being_written_is_ours_only_while_it_holds_the_start_of_a_marker(tmp_path):
    pid = dead_pid()
    head = '{"made_by": "rnp-fast", "for'  # where a kill before the rename may cut it
    staging = tmp_path / f".run.partial-{pid}-x"  # killed while announcing its second file
    with RunDirectory(tmp_path / "donor") as donor:
        donor.write_text("summary.json", "{}")
        shutil.copytree(donor.staging, staging)
    (staging / MARKER_BEING_WRITTEN).write_text(head)
    store = tmp_path / "store"  # killed while writing its first marker: holds nothing else
    store.mkdir()
    (store / MARKER_BEING_WRITTEN).write_text("")
    clean_up_after_killed_runs(tmp_path, "run")
    assert not staging.exists()
    with RunDirectory(store) as run:  # an empty folder to rnp-fast: replaced
        run.write_text("summary.json", "{}")
    assert sorted(p.name for p in store.iterdir()) == [MARKER, "summary.json"]
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (users / MARKER_BEING_WRITTEN).write_text("my own file, named so by chance")
    with pytest.raises(OutputError, match="was not made by rnp-fast"):
        RunDirectory(users)
    with pytest.raises(OutputError, match="was not written by rnp-fast"):
        write_marker(users, {"kind": "defense run"})
    (users / MARKER_BEING_WRITTEN).unlink()
    (users / MARKER_BEING_WRITTEN).symlink_to(users / "notes.txt")  # never written through
    with pytest.raises(OutputError, match="was not written by rnp-fast"):
        write_marker(users, {"kind": "defense run"})
    assert (users / "notes.txt").read_text() == "mine" and not (users / MARKER).exists()


WRITERS = """
import json, resource, signal, sys
import torch
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rnp_fast.checkpoint import save_reference_checkpoint, save_safetensors

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
folder, state = Path(sys.argv[1]), {"w": torch.zeros(200_000)}


def png(path):
    plt.figure(figsize=(20, 20))
    plt.imshow(torch.rand(1000, 1000).numpy())
    plt.savefig(path)


writers = {
    "torch.save": lambda p: save_reference_checkpoint(state, p),
    "safetensors": lambda p: save_safetensors(state, p),
    "json": lambda p: p.write_text(json.dumps(list(range(100_000)))),
    "png": png,
}
for name, write in writers.items():
    try:
        write(folder / name)
        print(name, "written")
    except OSError as error:
        print(name, "OSError", error.errno)
    except Exception as error:
        print(name, type(error).__name__)
"""


def test_every_writer_reports_a_full_disk_as_an_os_error(tmp_path):
    """A write that fails midway (a full disk; here a file-size limit, which fails the same way)
    raises OSError from every writer a run uses: torch.save's own writer says RuntimeError
    ('unexpected pos'), safetensors its own error type; both are turned into the OSError they are."""
    script = tmp_path / "writers.py"
    script.write_text(WRITERS)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines == {name: "OSError 27" for name in ("torch.save", "safetensors", "json", "png")}, done


def test_a_full_disk_mid_run_is_one_line_exit_1_and_the_previous_result_stays(world, tmp_path):
    """The whole command with a file-size limit below the purified model's size: exit 1, one OS-error
    line, the previous run intact, no staging folder left (issue 29)."""
    out = world / "full"
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(out))]
    assert main(argv) == 0
    previous = tree_digest(out)

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    done = subprocess.run(
        [sys.executable, "-m", "rnp_fast", *argv],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "File too large" in done.stderr, done.stderr
    assert tree_digest(out) == previous
    assert [p.name for p in world.iterdir() if p.name.startswith(".full.")] == []


def test_an_os_error_outside_a_run_folder_is_one_line_exit_1(tmp_path, capsys):
    """A sweep store whose sweep.log cannot be written (here: a folder of that name)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(RUNNABLE_SWEEP + "axes: {seed: [0]}\n")
    store = tmp_path / "st"
    store.mkdir()
    mark(store, "sweep store")
    (store / "sweep.log").mkdir()
    code, err = run_cli(["sweep", str(sweep), "--store", str(store), "--quiet"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"rnp-fast: error: cannot write {store}/sweep.log: Is a directory"
    ]
