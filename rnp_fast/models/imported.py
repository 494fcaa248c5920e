"""Architectures outside the zoo: ``--arch package.module:function`` with ``--arch-kwargs K=V``.

The function is imported by name (the module must be importable: installed, or on PYTHONPATH)
and called with the keyword arguments; its model's BatchNorm layers are swapped for the norm
layer RNP asks for (`models.swap`). Importing a module runs its code, as ``import`` does: that is
the user's own choice of architecture. The checkpoint is still read without running any code
(`checkpoint`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from torch import nn

from rnp_fast.errors import UserError
from rnp_fast.models.swap import swap_batchnorm

FACTORY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_factory_path(arch: str) -> bool:
    """``--arch`` names a factory (``module:function``) rather than a zoo architecture."""
    return ":" in arch


def check_factory_path(arch: str) -> None:
    if not FACTORY_PATH.match(arch):
        raise UserError(f"--arch {arch!r}: a model factory is written package.module:function")


def parse_value(text: str) -> int | float | bool | str:
    """int, then float, then true/false, else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_arch_kwargs(items: list[str]) -> dict[str, int | float | bool | str]:
    """``["num_classes=10,width=2", "pretrained=false"]`` -> keyword arguments (repeatable flag,
    each value may hold several comma-separated pairs)."""
    kwargs = {}
    for pair in (part.strip() for item in items for part in item.split(",") if part.strip()):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"--arch-kwargs takes KEY=VALUE pairs, got {pair!r}")
        kwargs[key.strip()] = parse_value(value.strip())
    return kwargs


def import_factory(arch: str) -> Callable[..., nn.Module]:
    """The function ``package.module:function`` names (a one-line UserError when it cannot be found)."""
    check_factory_path(arch)
    module_name, _, attribute = arch.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--arch {arch}: cannot import {module_name} ({error})") from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise UserError(f"--arch {arch}: {module_name} has no {attribute}")
    if not callable(found):
        raise UserError(f"--arch {arch}: {attribute} is not callable")
    return found


def imported_factory(arch: str, arch_kwargs: list[str]) -> Callable[[type[nn.Module]], nn.Module]:
    """A model factory (norm layer class -> new model) for ``--arch package.module:function``."""
    function, kwargs = import_factory(arch), parse_arch_kwargs(arch_kwargs)

    def build(norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
        try:
            model = function(**kwargs)
        except TypeError as error:  # a wrong keyword: the user's --arch-kwargs
            raise UserError(f"--arch {arch} with --arch-kwargs {kwargs}: {error}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--arch {arch} returned {type(model).__name__}, not a torch.nn.Module")
        return swap_batchnorm(model, norm_layer)

    return build
