"""FFCV: `rnp-fast convert`, the `.beton` round trip, and FFCVLoader == DeviceLoader batch for batch.

FFCV is an optional extra: without it these tests skip, except the one checking the install hint.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.attacks import build_trigger, training_plan
from rnp_fast.cli import main
from rnp_fast.errors import UserError
from rnp_fast.loaders.beton import require_ffcv
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.sources import ImageSet, digits_source

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not installed (pip install 'rnp-fast[ffcv]')")


def test_missing_ffcv_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` fail
    with pytest.raises(UserError, match=r"pip install 'rnp-fast\[ffcv\]'"):
        require_ffcv()
    assert main(["convert", "digits", str(tmp_path / "d.beton")]) == 2
    err = capsys.readouterr().err.strip()
    assert "FFCV is not installed" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory):
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed (pip install 'rnp-fast[ffcv]')")
    path = tmp_path_factory.mktemp("beton") / "digits-train.beton"
    assert main(["convert", "digits", str(path), "--quiet"]) == 0
    return path


@needs_ffcv
def test_beton_round_trip_preserves_every_image(digits_beton):
    from ffcv.loader import Loader, OrderOption

    source = digits_source()
    # FFCV's own default pipelines (decode + ToTensor), sequential, keeping the last partial batch.
    loader = Loader(str(digits_beton), batch_size=100, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False)
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader], strict=True)
    assert torch.equal(torch.cat(images), source.train.images)  # 1,198 images: 12 batches, the last of 98
    assert torch.equal(torch.cat(labels).reshape(-1), source.train.labels)


def small_set(count=45):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.arange(count) % 10)


@needs_ffcv
@pytest.mark.parametrize("attack", ["badnets", "wanet", "blend"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ffcv_and_device_loaders_yield_identical_batches(tmp_path, attack, channels_last):
    from rnp_fast.loaders.beton import write_beton
    from rnp_fast.loaders.ffcv_loader import FFCVLoader

    data = small_set()
    path = write_beton(data, tmp_path / "set.beton")
    plan = training_plan(build_trigger(attack, seed=4), data.labels, 0.2, "all2one", 0, 10, seed=2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    options = dict(batch_size=16, shuffle=True, augment=True, seed=7, poison=plan, channels_last=channels_last)
    ffcv = FFCVLoader(path, mean, std, yield_indices=True, **options)
    device = DeviceLoader(data, mean, std, yield_indices=True, **options)
    assert len(ffcv) == len(device) == 3 and ffcv.num_images == 45
    for epoch in (0, 1, 5):
        ffcv.set_epoch(epoch)
        device.set_epoch(epoch)
        seen = []
        for (x1, y1, i1), (x2, y2, i2) in zip(ffcv, device, strict=True):
            assert torch.equal(i1, i2) and torch.equal(y1, y2)
            assert torch.equal(plan.poisoned[i1], plan.poisoned[i2])  # the poisoned flags
            assert torch.equal(x1, x2)  # bit-identical floats
            assert x1.is_contiguous(memory_format=torch.channels_last) == channels_last
            seen += i1.tolist()
        assert sorted(seen) == list(range(45))  # no image dropped, none repeated


@needs_ffcv
def test_convert_cli_splits_and_bad_outputs(tmp_path, capsys):
    out = tmp_path / "test.beton"
    assert main(["convert", "digits", str(out), "--split", "test", "--quiet"]) == 0
    assert '"images": 599' in capsys.readouterr().out
    assert main(["convert", "digits", str(tmp_path), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["convert", "digits", str(tmp_path / "no" / "x.beton"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "mnist", str(tmp_path / "m.beton"), "--quiet"]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.beton"]  # no partial files left


def train_args(out, *extra):
    common = ["--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet", "--epochs", "1"]
    return ["train-backdoor", "--out", str(out), *common, *extra]


@needs_ffcv
@pytest.mark.parametrize("case", ["garbage", "truncated", "missing", "other split", "label-consistent"])
def test_unusable_beton_is_one_line_exit_2_and_writes_nothing(case, digits_beton, tmp_path, capsys):
    path = tmp_path / "x.beton"
    extra = []
    if case == "garbage":
        path.write_bytes(b"\x00not an ffcv file" * 10)
        expected = "cannot read .beton file"
    elif case == "truncated":
        path.write_bytes(digits_beton.read_bytes()[: digits_beton.stat().st_size // 2])
        expected = "truncated"
    elif case == "missing":
        expected = ".beton file not found"
    elif case == "other split":
        assert main(["convert", "digits", str(path), "--split", "test", "--quiet"]) == 0
        expected = "poisoning plan covers"
    else:
        path = digits_beton
        extra = ["--attack", "lc"]
        expected = "cannot carry the lc attack"
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(train_args(out, "--train-beton", str(path), *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@needs_ffcv
def test_train_backdoor_reads_a_beton(tmp_path):
    from test_datasets import write_folder

    root = write_folder(tmp_path / "f", per_class=6)
    beton = tmp_path / "f.beton"
    folder = ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16"]
    assert main(["convert", "imagefolder", str(beton), *folder[2:], "--quiet"]) == 0
    out = tmp_path / "run"
    args = ["train-backdoor", "--out", str(out), "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]
    assert main([*args, *folder, "--epochs", "1", "--batch-size", "8", "--train-beton", str(beton)]) == 0
    assert (out / "summary.json").is_file()


def test_convert_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "OUT.beton" in capsys.readouterr().out


# ----------------------------------------------------------------------------- torch's threads

THREADS_SCRIPT = """
import sys
import torch
from rnp_fast.loaders.beton import require_ffcv, write_beton
from rnp_fast.loaders.ffcv_loader import FFCVLoader
from rnp_fast.loaders.sources import digits_source

torch.set_num_threads(3)
require_ffcv()  # FFCV sets 1 thread when imported
assert torch.get_num_threads() == 3, ("import", torch.get_num_threads())
path = write_beton(digits_source().train, sys.argv[1])
loader = FFCVLoader(path, (0.5,), (0.5,), batch_size=256, device="cpu")  # FFCV sets its worker count
assert torch.get_num_threads() == 3, ("loader", torch.get_num_threads())
for epoch in range(2):  # and again at every epoch
    loader.set_epoch(epoch)
    for images, labels in loader:
        assert torch.get_num_threads() == 3, ("epoch", epoch, torch.get_num_threads())
print("kept")
"""


@needs_ffcv
def test_ffcv_keeps_the_callers_thread_count(tmp_path):
    # in a fresh process: ffcv must be imported here for the first time
    result = subprocess.run(
        [sys.executable, "-c", THREADS_SCRIPT, str(tmp_path / "d.beton")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "kept", result.stderr[-3000:]


SAME_MODEL_SCRIPT = """
import json
import sys
import torch
from safetensors.torch import load_file
from rnp_fast.cli import main

out, width = sys.argv[1], sys.argv[2]
threads = torch.get_num_threads()  # torch's default: one per core
common = ["--dataset", "digits", "--width", width, "--device", "cpu", "--quiet", "--epochs", "2"]
assert main(["convert", "digits", out + "/train.beton", "--quiet"]) == 0
assert main(["train-backdoor", "--out", out + "/beton", *common, "--train-beton", out + "/train.beton"]) == 0
after_ffcv = torch.get_num_threads()
assert main(["train-backdoor", "--out", out + "/device", *common]) == 0
beton, device = (load_file(out + name + "/model.safetensors") for name in ("/beton", "/device"))
summaries = [json.load(open(out + name + "/summary.json")) for name in ("/beton", "/device")]
print(json.dumps({
    "threads": [threads, after_ffcv],
    "same_weights": beton.keys() == device.keys() and all(torch.equal(beton[k], device[k]) for k in beton),
    "metrics": [[s["clean_acc"], s["asr"]] for s in summaries],
}))
"""


@needs_ffcv
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores: torch's default is then more than 1 thread")
def test_train_beton_trains_the_same_model_as_the_device_loader(tmp_path):
    """Identical batches and the same (default) thread count: the same float order, the same model."""
    result = subprocess.run(
        [sys.executable, "-c", SAME_MODEL_SCRIPT, str(tmp_path), str(TINY_WIDTH)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["threads"][0] == report["threads"][1] > 1
    assert report["same_weights"], report
    assert report["metrics"][0] == report["metrics"][1]
