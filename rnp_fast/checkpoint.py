"""Checkpoint I/O that never executes code from a file.

Reads safetensors files, and ``.pt``/``.pth``/``.tar`` files through ``torch.load(weights_only=True)``
(tensors and plain containers only). Both the reference's ``{'state_dict': ..., 'epoch': ...}``
layout and bare state dicts load; DataParallel's ``module.`` prefix is stripped. A checkpoint is
validated against the model before any work starts: missing and unexpected keys, shapes, and
non-finite values, and floating-point weights stored as integers, booleans or complex numbers
(which a silent cast would turn into a garbage model) are each named in the error.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from rnp_fast.errors import UserError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, without running any code it may contain."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a directory; give the checkpoint file inside it")
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is not the user's business
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise UserError(f"refused to load {path}: it holds more than plain tensors ({first_line})") from None
    except Exception as error:
        raise UserError(f"cannot read model file {path}: {type(error).__name__}: {error}") from None
    return unwrap_state_dict(loaded, path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:
        raise UserError(f"cannot read safetensors file {path}: {error}") from None


def unwrap_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} is not a state dict (expected a dict of tensors or {{'state_dict': ...}})")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def validate_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Raise a one-line UserError naming what does not fit ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{source} does not match --arch {arch}: "
            + "; ".join(
                part for part in (describe("missing keys", missing), describe("unexpected keys", unexpected)) if part
            )
        )
    wrong = [k for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        details = [f"{k} {tuple(state[k].shape)} (model expects {tuple(expected[k].shape)})" for k in wrong]
        classes = all(k.startswith(("linear.", "classifier.")) for k in wrong)
        hint = " - wrong number of classes for this dataset?" if classes else " - wrong --arch or --width?"
        raise UserError(f"{source} does not match --arch {arch}: shape mismatch in {describe('', details)}{hint}")
    not_float = [k for k, v in expected.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if not_float:
        key = not_float[0]
        raise UserError(
            f"{source}: {key} is stored as {str(state[key].dtype).removeprefix('torch.')}, but it is a "
            f"floating-point {'parameter' if key in dict(model.named_parameters()) else 'buffer'}; "
            "refusing to cast it (a damaged or wrong checkpoint)"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{source} has non-finite values (NaN or Inf) in {describe('', bad).strip()}")


def describe(what: str, keys: list[str], limit: int = 4) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{what} {shown}".strip()


def load_model_weights(model: nn.Module, path: str | Path, arch: str) -> nn.Module:
    state = read_state_dict(path)
    validate_state_dict(model, state, str(path), arch)
    model.load_state_dict(state)
    return model


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, created by Python's open() so that it honours the umask like every other
    file of a run (safetensors' own save_file writes a private temporary file and renames it: 0600);
    a failed write (a full disk) raises the OSError it is."""
    from safetensors import SafetensorError
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    try:
        data = save(tensors, metadata=metadata)
    except SafetensorError as error:
        raise as_os_error(error, path) from None
    with open(path, "wb") as handle:
        handle.write(data)


def as_os_error(error: Exception, path: Path) -> OSError:
    """safetensors reports an I/O failure as ``SafetensorError: ... (os error 28)``: the OSError it
    stands for, so that the writer turns it into its one line (unknown numbers: an I/O error)."""
    found = re.search(r"os error (\d+)", str(error))
    number = int(found[1]) if found else errno.EIO
    return OSError(number, os.strerror(number), str(path))


def save_reference_checkpoint(state: dict[str, torch.Tensor], path: Path, **extra) -> None:
    """The reference's layout: ``{'state_dict': ..., **extra}`` through torch.save into memory, then
    written to ``path`` by Python, so that a failed write (a full disk) raises the OSError it is:
    torch's own writer turns it into ``RuntimeError: ... unexpected pos``, even into a file we open."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state.items()}, **extra}, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())
