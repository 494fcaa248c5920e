"""The Python API's caller's model and labels, checked before any work (one `UserError` each).

The CLI builds its models and reads its labels from datasets it knows; the Python API takes them
from the caller, where they can be wrong in ways that would otherwise surface minutes later, deep
inside torch (``IndexError: Target 42 is out of bounds``, ``element 0 of tensors does not require
grad``). Each check here names the problem and what to do about it instead:

- a model with parameters or buffers on the ``meta`` device (no values to defend);
- a model whose parameters are all frozen (RNP trains a copy of it: unlearning needs gradients);
- a forward that does not return one ``[N, classes]`` tensor of logits (a tuple, a dict, ...);
- labels (defense, test, poisoned) outside the classes that forward returns.

The forward is run once, on two defense images, in eval mode and without gradients, so it changes
nothing in the caller's model (its train/eval flag is put back).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from rnp_fast.errors import UserError
from rnp_fast.evaluation.test_sets import TestSets
from rnp_fast.loaders.augment import normalisation, normalise
from rnp_fast.loaders.sources import ImageSet


def check_python_inputs(model: nn.Module, defense: ImageSet, tests: TestSets, mean, std) -> None:
    """Every check of the module docstring, cheapest first."""
    check_has_values(model)
    check_trainable(model)
    classes = output_classes(model, defense.images[:2], mean, std)
    check_labels(defense.labels, "defense", classes)
    check_labels(tests.clean.labels, "test", classes)
    check_labels(tests.poison_targets, "poisoned", classes)
    check_labels(tests.poisoned.labels, "poisoned true labels", classes)


def check_has_values(model: nn.Module) -> None:
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    on_meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if on_meta is not None:
        raise UserError(
            f"the model's {on_meta} is on the meta device (it has no values): load its weights first "
            "(e.g. model.to_empty(device='cpu') then model.load_state_dict(...))"
        )


def check_trainable(model: nn.Module) -> None:
    parameters = list(model.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        raise UserError(
            "every parameter of the model is frozen (requires_grad=False); RNP unlearns and recovers a copy "
            "of it by gradient descent: call model.requires_grad_(True) first (the model itself is not changed)"
        )


def output_classes(model: nn.Module, images: torch.Tensor, mean, std) -> int:
    """The number of classes ``model`` scores, from one forward of ``images`` (uint8, [N, C, H, W])."""
    reference = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    batch = normalise(images.cpu(), *normalisation(mean, std, "cpu")).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(batch)
    except Exception as error:
        raise UserError(f"the model's forward failed on two defense images: {type(error).__name__}: {error}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise UserError(
            f"the model's forward returned a {type(output).__name__}; rnp-fast needs the logits as one tensor "
            "[N, classes] (wrap the model in a module whose forward returns only the logits)"
        )
    if output.dim() != 2 or output.shape[0] != len(batch):
        raise UserError(
            f"the model's forward returned a tensor of shape {tuple(output.shape)} for {len(batch)} images; "
            f"rnp-fast needs logits of shape [{len(batch)}, classes]"
        )
    return int(output.shape[1])


def check_labels(labels: torch.Tensor, name: str, classes: int) -> None:
    """Labels must name one of the model's ``classes`` (negative ones are 'not given')."""
    known = labels[labels >= 0]
    if len(known) and int(known.max()) >= classes:
        raise UserError(f"{name}: label {int(known.max())} is outside the model's {classes} classes (0..{classes - 1})")
