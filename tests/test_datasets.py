"""Dataset sources read from their standard directory layouts, built here as tiny fakes.

Each fake holds a handful of images whose pixels are known, so a test can check that every image
arrives with the right label, at the right size, decoded exactly as Pillow decodes it; and that a
broken directory is one clear line (exit code 2) that names the problem.
"""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rnp_fast.cli import main
from rnp_fast.errors import UserError
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.reference_loader import ReferenceLoader
from rnp_fast.loaders.sources import DATASETS, load_source


def random_rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(array: np.ndarray, path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)


def pillow_chw(path, size: int) -> np.ndarray:
    """The expected decode: Pillow RGB, bilinear resize only when the size differs."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def expect_user_error(match: str, *args, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        load_source(*args, **kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- CIFAR-100


def write_cifar100(root, train_count=30, test_count=10, labels=None):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train_count), ("test", test_count)):
        fine = labels if labels is not None else [int(v) for v in rng.integers(0, 100, count)]
        batch = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar100_reads_fine_labels_and_pixels(tmp_path):
    folder = write_cifar100(tmp_path)
    source = load_source("cifar100", str(tmp_path))
    raw = pickle.loads((folder / "train").read_bytes())
    assert source.num_classes == 100 and source.image_shape == (3, 32, 32)
    assert source.train.labels.tolist() == raw[b"fine_labels"]
    # Rows are 1,024 red, then green, then blue values, row-major.
    assert np.array_equal(source.train.images[3, 1].numpy().ravel(), raw[b"data"][3, 1024:2048])
    assert len(source.test) == 10
    assert load_source("cifar100", str(folder)).train.labels.tolist() == raw[b"fine_labels"]


def test_cifar100_bad_directories(tmp_path):
    expect_user_error("CIFAR-100 not found", "cifar100", str(tmp_path))
    expect_user_error("CIFAR-100 not found.*no --data-dir", "cifar100", None)
    folder = write_cifar100(tmp_path / "labels", labels=[100] * 30)
    expect_user_error("labels outside 0..99", "cifar100", str(folder))
    folder = write_cifar100(tmp_path / "missing")
    (folder / "test").unlink()
    expect_user_error("CIFAR-100 file missing", "cifar100", str(folder))


def test_cifar100_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = write_cifar100(tmp_path)
    (folder / "train").write_bytes(pickle.dumps({b"data": Exploit(), b"fine_labels": [0]}))
    expect_user_error("cannot read CIFAR-100 batch.*refusing to load", "cifar100", str(tmp_path))
    assert not marker.exists()


def test_pickle_datasets_are_32x32_only(tmp_path):
    expect_user_error("--image-size 64: cifar100 images are 32x32", "cifar100", str(tmp_path), image_size=64)


# ---------------------------------------------------------------- GTSRB

GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb(root, classes=3, per_class=2, with_train_gt=True):
    """Official layout under root/GTSRB; image sizes vary as in the real set."""
    base = root / "GTSRB"
    for label in range(classes):
        folder = base / "Final_Training" / "Images" / f"{label:05d}"
        rows = [GTSRB_HEADER]
        for k in range(per_class):
            name = f"{label:05d}_{k:05d}.ppm"
            height, width = 20 + 7 * k, 30 + 5 * label
            save(random_rgb(10 * label + k, height, width), folder / name)
            rows.append(f"{name};{width};{height};1;1;{width - 2};{height - 2};{label}")
        if with_train_gt:
            (folder / f"GT-{label:05d}.csv").write_text("\n".join(rows) + "\n")
    images = base / "Final_Test" / "Images"
    rows = [GTSRB_HEADER]
    for k in range(4):
        save(random_rgb(100 + k, 32 + k, 40), images / f"{k:05d}.ppm")
        rows.append(f"{k:05d}.ppm;40;{32 + k};1;1;38;30;{k % classes}")
    (images / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return base


def test_gtsrb_official_layout(tmp_path):
    base = write_gtsrb(tmp_path)
    source = load_source("gtsrb", str(tmp_path))
    assert source.name == "gtsrb" and source.num_classes == 3 and source.image_shape == (3, 32, 32)
    assert source.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert source.test.labels.tolist() == [0, 1, 2, 0]
    first = base / "Final_Training" / "Images" / "00001" / "00001_00001.ppm"
    assert np.array_equal(source.train.images[3].numpy(), pillow_chw(first, 32))
    assert np.array_equal(source.test.images[2].numpy(), pillow_chw(base / "Final_Test/Images/00002.ppm", 32))
    resized = load_source("gtsrb", str(base), image_size=16)  # the GTSRB folder itself also works
    assert resized.image_shape == (3, 16, 16)
    assert np.array_equal(resized.train.images[3].numpy(), pillow_chw(first, 16))


def test_gtsrb_training_folders_without_gt_files(tmp_path):
    write_gtsrb(tmp_path, with_train_gt=False)
    assert load_source("gtsrb", str(tmp_path)).train.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_gtsrb_bad_directories(tmp_path):
    expect_user_error("needs --data-dir", "gtsrb", None)
    expect_user_error("no Final_Training/Images", "gtsrb", str(tmp_path))
    base = write_gtsrb(tmp_path / "a")
    (base / "Final_Test" / "Images" / "GT-final_test.csv").unlink()
    expect_user_error("GT-final_test.csv \\(from GTSRB_Final_Test_GT.zip\\)", "gtsrb", str(base))

    base = write_gtsrb(tmp_path / "b")
    (base / "Final_Training/Images/00001/00001_00000.ppm").unlink()
    expect_user_error("image file missing: .*00001_00000.ppm", "gtsrb", str(base))

    base = write_gtsrb(tmp_path / "c")
    (base / "Final_Test/Images/00003.ppm").write_bytes(b"not an image")
    expect_user_error("cannot decode image .*00003.ppm", "gtsrb", str(base))

    base = write_gtsrb(tmp_path / "d")
    (base / "Final_Test/Images/GT-final_test.csv").write_text("a,b,c\n1,2,3\n")
    expect_user_error("malformed GTSRB annotation file", "gtsrb", str(base))

    base = write_gtsrb(tmp_path / "e")
    gt = base / "Final_Training/Images/00002/GT-00002.csv"
    gt.write_text(gt.read_text().replace(";2\n", ";1\n"))
    expect_user_error("labelled with another class than its folder 00002", "gtsrb", str(base))

    base = write_gtsrb(tmp_path / "f")
    gt = base / "Final_Test/Images/GT-final_test.csv"
    gt.write_text(gt.read_text().replace(";0\n", ";7\n"))
    expect_user_error("test labels go up to 7 but the training set has 3 classes", "gtsrb", str(base))


# ---------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02124075", "n01443537", "n09256479"]  # deliberately unsorted, as in the real wnids.txt


def write_tiny(root, per_class=2):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class):
            mode = "L" if (c, k) == (1, 0) else "RGB"  # the real set has some grayscale files
            save(random_rgb(10 * c + k, 64, 64), base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", mode)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for k, wnid in enumerate([WNIDS[2], WNIDS[0], WNIDS[1], WNIDS[2]]):
        save(random_rgb(100 + k, 64, 64), base / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tiny_imagenet_layout(tmp_path):
    base = write_tiny(tmp_path)
    source = load_source("tiny-imagenet", str(tmp_path))
    assert source.num_classes == 3 and source.image_shape == (3, 64, 64)
    order = sorted(WNIDS)  # class index = position among the sorted wnids (torchvision's ImageFolder order)
    expected_train = [order.index(w) for w in sorted(WNIDS) for _ in range(2)]
    assert source.train.labels.tolist() == expected_train
    assert source.test.labels.tolist() == [order.index(w) for w in (WNIDS[2], WNIDS[0], WNIDS[1], WNIDS[2])]
    gray = base / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG"
    row = expected_train.index(order.index(WNIDS[1]))
    assert np.array_equal(source.train.images[row].numpy(), pillow_chw(gray, 64))  # not resampled
    assert torch.equal(source.train.images[row, 0], source.train.images[row, 2])  # gray -> 3 equal channels
    assert load_source("tiny-imagenet", str(base), image_size=32).image_shape == (3, 32, 32)


def test_tiny_imagenet_bad_directories(tmp_path):
    expect_user_error("Tiny-ImageNet not found", "tiny-imagenet", str(tmp_path))
    base = write_tiny(tmp_path / "a")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    expect_user_error("line 1: expected .*n99999999", "tiny-imagenet", str(base))
    base = write_tiny(tmp_path / "b")
    (base / "val" / "val_annotations.txt").unlink()
    expect_user_error("validation labels missing", "tiny-imagenet", str(base))
    base = write_tiny(tmp_path / "c")
    (base / "wnids.txt").write_text("\n".join([*WNIDS, "n00000001"]))
    expect_user_error("class n00000001 has no training folder", "tiny-imagenet", str(base))


# ---------------------------------------------------------------- ImageFolder


def write_folder(root, classes=("dog", "cat", "bird"), per_class=3, test_split="test"):
    for c, name in enumerate(classes):
        for k in range(per_class):
            save(random_rgb(10 * c + k, 24 + k, 36), root / "train" / name / f"{k}.png")
        save(random_rgb(100 + c, 32, 32), root / test_split / name / "0.jpg")
    return root


def test_image_folder_layout(tmp_path):
    root = write_folder(tmp_path / "pets")
    source = load_source("imagefolder", str(root))
    assert source.num_classes == 3 and source.name == "imagefolder:pets"
    assert source.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # bird, cat, dog (sorted)
    assert source.test.labels.tolist() == [0, 1, 2]
    assert np.array_equal(source.train.images[4].numpy(), pillow_chw(root / "train" / "cat" / "1.png", 32))
    assert np.array_equal(source.test.images[2].numpy(), pillow_chw(root / "test" / "dog" / "0.jpg", 32))
    assert load_source("imagefolder", str(root), image_size=40).image_shape == (3, 40, 40)
    assert len(source.mean) == 3 and all(0 < s < 1 for s in source.std)
    val = load_source("imagefolder", str(write_folder(tmp_path / "v", test_split="val")))
    assert val.test.labels.tolist() == [0, 1, 2]


def test_image_folder_bad_directories(tmp_path):
    expect_user_error("is not a directory", "imagefolder", str(tmp_path / "nope"))
    expect_user_error("is not an ImageFolder dataset", "imagefolder", str(tmp_path))
    root = write_folder(tmp_path / "a")
    save(random_rgb(0, 8, 8), root / "test" / "fish" / "0.png")
    expect_user_error("class 'fish' is not among the train split's classes", "imagefolder", str(root))
    root = write_folder(tmp_path / "b")
    for path in (root / "train" / "cat").iterdir():
        path.unlink()
    expect_user_error("class folder .*cat has no images", "imagefolder", str(root))
    root = write_folder(tmp_path / "c")
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    expect_user_error("cannot decode image .*dog/1.png", "imagefolder", str(root))


def test_every_dataset_is_listed_and_unknown_names_are_refused():
    assert {"digits", "cifar10", "cifar100", "gtsrb", "tiny-imagenet", "imagefolder"} <= set(DATASETS)
    expect_user_error("unknown dataset 'mnist'", "mnist")


def test_both_loaders_read_a_directory_source(tmp_path):
    source = load_source("imagefolder", str(write_folder(tmp_path / "f")))
    kwargs = dict(batch_size=4, shuffle=True, augment=True, seed=3)
    fast = DeviceLoader(source.train, source.mean, source.std, **kwargs)
    slow = ReferenceLoader(source.train, source.mean, source.std, **kwargs)
    for (x1, y1), (x2, y2) in zip(fast, slow, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def train_args(out, *extra):
    return ["train-backdoor", "--out", str(out), "--width", "0.125", "--device", "cpu", "--quiet", *extra]


def test_train_backdoor_on_an_image_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "f", per_class=6)
    out = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16", "--epochs", "1"]
    assert main(train_args(out, *args, "--batch-size", "8", "--target", "2")) == 0
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "imagefolder", "--data-dir", "{missing}"], "is not a directory"),
        (["--dataset", "gtsrb", "--data-dir", "{empty}"], "no Final_Training/Images"),
        (["--dataset", "imagefolder", "--data-dir", "{broken}"], "cannot decode image"),
        (["--dataset", "imagefolder", "--data-dir", "{good}", "--target", "3"], "--target 3 is outside the 3 classes"),
        (["--dataset", "digits", "--image-size", "48"], "digits images are 32x32"),
        (["--dataset", "digits", "--image-size", "4"], "--image-size must be in 8..1024"),
    ],
)
def test_bad_dataset_directory_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    broken = write_folder(tmp_path / "broken")
    (broken / "test" / "cat" / "0.jpg").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    good = write_folder(tmp_path / "good")
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "broken": broken, "good": good}
    out = tmp_path / "run"
    assert main(train_args(out, *[a.format(**paths) for a in extra])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
