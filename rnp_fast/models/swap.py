"""Any model with BatchNorm2d layers, made maskable: module replacement on a copy.

The zoo builds its models with the norm layer RNP asks for; a model from elsewhere (the caller's
own class, torchvision, timm) was built with ``nn.BatchNorm2d``. `swap_batchnorm` replaces every
BatchNorm layer of a model, in place, by ``norm_layer`` (``MaskedBatchNorm2d`` for recovering,
plain ``nn.BatchNorm2d`` for everything else) with the same settings, parameters and buffers, under
the same name: the state dict keeps its keys (plus ``neuron_mask`` for the masked layer).

A layer is swapped only when plain BatchNorm2d arithmetic reproduces it exactly: BatchNorm2d and
its subclasses that keep its forward, and SyncBatchNorm in a single process (where it computes
what BatchNorm2d computes). Anything else (1-d or 3-d BatchNorm, no affine weight to mask, a
cumulative moving average, an overridden forward, an uninitialised lazy layer) is refused with
the layer names, before any work.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter

from rnp_fast.errors import UserError

SAME_FORWARD = (_BatchNorm.forward, nn.SyncBatchNorm.forward)  # forwards BatchNorm2d arithmetic reproduces


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(name, module) of every BatchNorm layer (any dimension, SyncBatchNorm included), in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def why_not_maskable(layer: _BatchNorm) -> str | None:
    """The reason ``layer`` cannot become a masked BatchNorm2d, or None when it can."""
    if not isinstance(layer, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return f"{type(layer).__name__} is not a 2-d BatchNorm"
    if isinstance(layer.weight, UninitializedParameter):
        return "an uninitialised lazy layer (run one forward first)"
    if not layer.affine:
        return "affine=False: no weight to mask"
    if layer.momentum is None:
        return "momentum=None (a cumulative moving average)"
    if type(layer).forward not in SAME_FORWARD:
        return f"{type(layer).__name__} overrides forward"
    if isinstance(layer, nn.SyncBatchNorm) and distributed_world_size() > 1:
        return "SyncBatchNorm across processes (defend in a single process)"
    return None


def distributed_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_maskable(model: nn.Module) -> None:
    """A one-line UserError unless the model has BatchNorm layers and every one can be masked."""
    layers = batchnorm_layers(model)
    if not layers:
        raise UserError(
            f"{type(model).__name__} has no BatchNorm2d layer: RNP prunes BatchNorm channels, so it cannot defend it"
        )
    refused = [(name, reason) for name, layer in layers if (reason := why_not_maskable(layer))]
    if refused:
        shown = "; ".join(f"{name or '(the model)'}: {reason}" for name, reason in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise UserError(f"{type(model).__name__} has BatchNorm layers RNP cannot mask: {shown}{more}")


def swap_batchnorm(model: nn.Module, norm_layer: type[nn.BatchNorm2d]) -> nn.Module:
    """Replace, in place, every BatchNorm layer not already of type ``norm_layer`` by one that is,
    keeping its settings, parameters, buffers and train/eval flag; returns ``model``."""
    check_maskable(model)
    for name, layer in batchnorm_layers(model):
        if not name:
            raise UserError("the model is a single BatchNorm layer; give the network that contains it")
        if type(layer) is not norm_layer:
            model.set_submodule(name, replacement(layer, norm_layer))
    return model


def replacement(layer: _BatchNorm, norm_layer: type[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    new = norm_layer(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    # strict=False: the masked layer has one more parameter (its mask, initialised to 1)
    missing, unexpected = new.load_state_dict(layer.state_dict(), strict=False)
    assert not unexpected and all(key == "neuron_mask" for key in missing), (missing, unexpected)
    new.to(layer.weight.device)
    return new.train(layer.training)
