"""Data sources and loaders: the device loader and the reference DataLoader agree exactly."""

import numpy as np
import torch

from rnp_fast.attacks import build_trigger, training_plan
from rnp_fast.loaders.augment import crop_flip_batch, crop_flip_image, draw_params
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.reference_loader import ReferenceLoader
from rnp_fast.loaders.sources import ImageSet, digits_source


def small_set(count=37):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.arange(count) % 10)


def test_digits_source_is_fixed_and_shaped():
    source = digits_source()
    assert source.train.images.shape == (1198, 3, 32, 32) and source.train.images.dtype == torch.uint8
    assert len(source.test) == 599 and source.num_classes == 10
    again = digits_source()
    assert torch.equal(source.test.labels, again.test.labels)
    assert torch.bincount(source.test.labels).min() >= 50  # stratified


def test_batched_crop_flip_equals_per_image():
    data = small_set(8)
    params = draw_params(8, seed=3, epoch=2)
    batched = crop_flip_batch(data.images, params.offsets, params.flips)
    for i in range(8):
        single = crop_flip_image(data.images[i].numpy(), tuple(params.offsets[i].tolist()), bool(params.flips[i]))
        assert np.array_equal(batched[i].numpy(), single)


def test_device_and_reference_loaders_yield_identical_batches():
    data, mean, std = small_set(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    kwargs = dict(batch_size=16, shuffle=True, augment=True, seed=7)
    fast, slow = DeviceLoader(data, mean, std, **kwargs), ReferenceLoader(data, mean, std, **kwargs)
    for epoch in (0, 3):
        fast.set_epoch(epoch)
        slow.set_epoch(epoch)
        for (x1, y1), (x2, y2) in zip(fast, slow, strict=True):
            assert torch.equal(y1, y2)
            assert torch.equal(x1, x2)  # bit-identical floats


def test_no_image_is_dropped_and_epochs_differ():
    data = small_set(37)
    loader = DeviceLoader(data, (0.5,) * 3, (0.2,) * 3, batch_size=16, shuffle=True, seed=0)
    sizes = [len(y) for _, y in loader]
    assert sizes == [16, 16, 5] and len(loader) == 3
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(data.labels.tolist())
    assert not torch.equal(first, second)


def test_poison_plan_is_applied_by_index():
    data = small_set(20)
    plan = training_plan(build_trigger("badnets"), data.labels, 0.25, "all2one", 0, 10, seed=0)
    assert int(plan.poisoned.sum()) == 5
    loader = DeviceLoader(data, (0.0,) * 3, (1 / 255,) * 3, batch_size=20, poison=plan)
    images, labels = next(iter(loader))
    flags = plan.poisoned
    assert (labels[flags] == 0).all() and torch.equal(labels[~flags], data.labels[~flags])
    corner = images[:, 0, 29:, 29:].round().to(torch.uint8)
    expected = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert all(torch.equal(corner[i], expected) for i in torch.nonzero(flags).flatten())
