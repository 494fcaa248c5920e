"""Backdoor attacks: triggers as batched device operations, and poisoning plans.

``build_trigger(name, image_size, channels, seed, **params)`` is the one entry point: every factory
in ``TRIGGERS`` takes keyword arguments only (``image_size``, ``channels``, ``seed`` and its own
parameters, all with defaults except files a trigger cannot do without), so ``TRIGGERS[name]()``
also works. ``DEFAULT_LABEL_MODE`` gives the label mode each attack is normally run with.
"""

from __future__ import annotations

import inspect
from os import PathLike

from rnp_fast.attacks.badnets import four_corner_trigger, grid_trigger, one_pixel_trigger, square_trigger
from rnp_fast.attacks.base import (
    LABEL_MODES,
    PoisonPlan,
    Trigger,
    poisoned_labels,
    poisoned_test_plan,
    training_plan,
)
from rnp_fast.attacks.blend import blend_trigger
from rnp_fast.attacks.sig import SigTrigger, reference_sig_trigger
from rnp_fast.attacks.trojan import load_reference_trojan, seeded_trojan
from rnp_fast.attacks.user_patch import load_png, user_trigger
from rnp_fast.attacks.wanet import WaNetTrigger, cross_noise_rate
from rnp_fast.errors import UserError

# The shared keywords every factory accepts; the BadNets family ignores them (size-agnostic stamps).
COMMON = ("image_size", "channels", "seed")


def _grid(*, image_size=32, channels=3, seed=0):
    return grid_trigger()


def _square(*, image_size=32, channels=3, seed=0, size=3, distance=1):
    return square_trigger(size=size, distance=distance)


def _four_corner(*, image_size=32, channels=3, seed=0):
    return four_corner_trigger()


def _one_pixel(*, image_size=32, channels=3, seed=0):
    return one_pixel_trigger()


def _blend(*, image_size=32, channels=3, seed=0, alpha=0.2, pattern=None):
    """``pattern``: a PNG path, a uint8 [C, H, W] array/tensor, or None for seeded noise."""
    expected = (channels, image_size, image_size)
    if isinstance(pattern, (str, PathLike)):
        pattern = load_png(pattern, channels, image_size)
    if pattern is not None and tuple(pattern.shape) != expected:
        raise UserError(f"blend pattern has shape {tuple(pattern.shape)}, expected {expected}")
    return blend_trigger(pattern, alpha=alpha, image_size=image_size, channels=channels, seed=seed)


def _sig(*, image_size=32, channels=3, seed=0, delta=20.0, frequency=6.0):
    return SigTrigger(delta=delta, frequency=frequency)


def _sig_reference(*, path, image_size=32, channels=3, seed=0, alpha=0.2):
    return reference_sig_trigger(path, alpha=alpha, image_size=image_size, channels=channels)


def _trojan(*, image_size=32, channels=3, seed=0, path=None):
    """``path``: the reference's .npz; without it, a seeded 3x3 additive patch at the same place."""
    if path is None:
        return seeded_trojan(image_size, channels, seed)
    return load_reference_trojan(path, image_size=image_size, channels=channels)


def _wanet(*, image_size=32, channels=3, seed=0, k=4, strength=0.5, grid_rescale=1.0, noise_rate=None):
    rate = cross_noise_rate(0.1) if noise_rate is None else noise_rate
    return WaNetTrigger(image_size, seed, k=k, strength=strength, grid_rescale=grid_rescale, noise_rate=rate)


def _user(*, pattern, image_size=32, channels=3, seed=0, mask=None, mask_mode="replace"):
    return user_trigger(pattern, mask=mask, mask_mode=mask_mode, image_size=image_size, channels=channels)


# name -> keyword-only factory(image_size=, channels=, seed=, **params)
TRIGGERS = {
    "badnets": _grid,
    "grid": _grid,
    "square": _square,
    "four-corner": _four_corner,
    "one-pixel": _one_pixel,
    "blend": _blend,
    "sig": _sig,
    "sig-reference": _sig_reference,
    "trojan": _trojan,
    "wanet": _wanet,
    "user": _user,
}

# SIG is clean-label by design (it only poisons target-class images); the rest relabel to the target.
DEFAULT_LABEL_MODE = {name: ("clean-label" if name.startswith("sig") else "all2one") for name in TRIGGERS}


def trigger_parameters(name: str) -> list[str]:
    """The attack-specific parameter names ``build_trigger`` accepts for ``name``."""
    return [p for p in inspect.signature(TRIGGERS[name]).parameters if p not in COMMON]


def build_trigger(name: str, image_size: int = 32, channels: int = 3, seed: int = 0, **params) -> Trigger:
    """The trigger ``name`` for ``channels`` x ``image_size`` x ``image_size`` images.

    Raises UserError for an unknown attack, an unknown or missing parameter, or a bad value.
    """
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose one of {', '.join(TRIGGERS)}")
    signature = inspect.signature(TRIGGERS[name])
    allowed = trigger_parameters(name)
    for key in params:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise UserError(f"attack {name!r} has no parameter {key!r} (valid: {valid})")
    missing = [p.name for p in signature.parameters.values() if p.default is p.empty and p.name not in params]
    if missing:
        raise UserError(f"attack {name!r} needs parameter {missing[0]!r}")
    try:
        return TRIGGERS[name](image_size=image_size, channels=channels, seed=seed, **params)
    except ValueError as error:  # bad values (alpha out of range, patch too large): the user's
        raise UserError(f"attack {name!r}: {error}") from error


__all__ = [
    "DEFAULT_LABEL_MODE",
    "LABEL_MODES",
    "PoisonPlan",
    "TRIGGERS",
    "Trigger",
    "build_trigger",
    "poisoned_labels",
    "poisoned_test_plan",
    "training_plan",
]
