"""K models of one architecture as one network (a fused array, the HFTA approach, MLSys 2021).

Used by the GPU probe's ``fused`` section and the micro-benchmarks to measure whether running K
defenses' learning steps as one step pays; the product does not train fused arrays yet (see
docs/performance.md, "Fused arrays", for what fuses and what does not).

Model k owns channels ``[k*C, (k+1)*C)`` of every layer:

- a convolution of ``groups`` g becomes one of ``K*g`` groups over ``K*C_in -> K*C_out`` channels,
  its weight the K weights stacked: group k sees only model k's channels;
- a BatchNorm (masked or not) becomes one over ``K*C`` channels: its statistics, affine
  parameters and masks are per channel, so per model;
- the final linear layer becomes a batched matrix product (`ArrayLinear`), weight ``[K, out, in]``;
- parameter-free layers (ReLU, pooling, residual additions) act per channel and need nothing.

The input holds each model's own batch side by side in the channels, ``[B, K*3, H, W]``
(`stack_batches`), so every model keeps its own images, order and augmentation, but all K batches
must have the same size B. The output is ``[B, classes, K]``, which is what ``F.cross_entropy``
takes with labels ``[B, K]`` (`stack_labels`): its mean over the B*K samples is 1/K of the sum of
the K models' own losses, so `array_recipe` scales the loss by K and each model's gradient is its
own. Plain SGD with momentum and weight decay acts element by element, so one optimiser over the
fused parameters makes every model's own update. Results equal separate models' up to the order
of float sums (tests/test_fused_models.py states the tolerances), not bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from rnp_fast.masked_batchnorm import MaskedBatchNorm2d


class ArrayLinear(nn.Module):
    """K linear layers applied to their own model's features: ``[B, K*in] -> [B, out, K]``."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))  # [K, out, in]
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))  # [K, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, _, features = self.weight.shape
        per_model = x.reshape(len(x), k, features).transpose(0, 1)  # [K, B, in]
        out = torch.baddbmm(self.bias.unsqueeze(1), per_model, self.weight.transpose(1, 2))  # [K, B, out]
        return out.permute(1, 2, 0)  # [B, out, K]


def fuse(models: list[nn.Module]) -> nn.Module:
    """One network computing all of ``models`` (same architecture and sizes), each from its own
    channels of the input; its parameters are copies (the models are left as they are)."""
    if not models:
        raise ValueError("no models to fuse")
    fused = copy.deepcopy(models[0])
    for name, module in list(fused.named_modules()):
        parts = [dict(m.named_modules())[name] for m in models]
        replacement = fused_layer(module, parts)
        if replacement is not None:
            set_submodule(fused, name, replacement)
    return fused


def fused_layer(module: nn.Module, parts: list[nn.Module]) -> nn.Module | None:
    """The fused version of a leaf layer (None: nothing to change); layers with parameters that
    are not convolutions, BatchNorms or the final linear layer cannot be fused channel-wise."""
    if isinstance(module, nn.Conv2d):
        return fused_conv(parts)
    if isinstance(module, nn.BatchNorm2d):
        return fused_batch_norm(parts)
    if isinstance(module, nn.Linear):
        return ArrayLinear(parts)
    if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"{type(module).__name__} has parameters and no fused form")
    return None


def fused_conv(parts: list[nn.Conv2d]) -> nn.Conv2d:
    first = parts[0]
    conv = nn.Conv2d(
        first.in_channels * len(parts),
        first.out_channels * len(parts),
        first.kernel_size,
        first.stride,
        first.padding,
        first.dilation,
        first.groups * len(parts),
        bias=first.bias is not None,
        padding_mode=first.padding_mode,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([p.weight for p in parts]))  # [K*C_out, C_in/g, kh, kw]
        if first.bias is not None:
            conv.bias.copy_(torch.cat([p.bias for p in parts]))
    return conv.to(first.weight.device)


def fused_batch_norm(parts: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first = parts[0]
    norm = type(first)(first.num_features * len(parts), eps=first.eps, momentum=first.momentum)
    norm = norm.to(first.weight.device)
    states = [p.state_dict() for p in parts]
    state = {key: torch.cat([s[key] for s in states]) for key in states[0] if key != "num_batches_tracked"}
    state["num_batches_tracked"] = first.num_batches_tracked.clone()  # one count: the models step together
    norm.load_state_dict(state)
    if isinstance(first, MaskedBatchNorm2d):
        norm.fused = first.fused  # the same kernel choice as the models'
    return norm


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def unfuse(fused: nn.Module, models: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """The state dict of each model as the fused network holds it now (``models`` give the names
    and shapes), to compare with separately trained models."""
    k, states = len(models), []
    fused_state = fused.state_dict()
    for index, model in enumerate(models):
        state = {}
        for key, value in model.state_dict().items():
            whole = fused_state[key]
            if key.endswith("num_batches_tracked"):
                state[key] = whole
            elif whole.dim() >= 1 and whole.shape[0] == k and whole.shape[1:] == value.shape:
                state[key] = whole[index]  # ArrayLinear's stacked weight and bias
            else:
                state[key] = whole.reshape(k, *value.shape)[index]
        states.append(state)
    return states


def stack_batches(images: list[torch.Tensor]) -> torch.Tensor:
    """K batches ``[B, C, H, W]`` (one per model, the same B) as one input ``[B, K*C, H, W]``."""
    sizes = {len(batch) for batch in images}
    if len(sizes) != 1:
        raise ValueError(f"a fused array needs batches of one size, got {sorted(sizes)}")
    return torch.cat(images, dim=1)


def stack_labels(labels: list[torch.Tensor]) -> torch.Tensor:
    """K label vectors ``[B]`` as ``[B, K]``, the targets of the ``[B, classes, K]`` output."""
    return torch.stack(labels, dim=1)


def array_recipe(recipe, k: int):
    """A stage recipe for an array of ``k`` models: the loss scaled by ``k`` (cross-entropy over
    ``[B, classes, K]`` is the mean of the K models' means). Gradient clipping bounds each model's
    own gradient norm, which one clip over the array cannot do, so it is refused."""
    if recipe.grad_clip > 0:
        raise ValueError("gradient clipping is per model: it does not fuse")
    return replace(recipe, loss_scale=recipe.loss_scale * k)


@dataclass
class StepArray:
    """K models' learning steps, run one model at a time and as one fused array, from the same
    start: what the probe and the micro-benchmarks time and the tests compare."""

    models: list[nn.Module]  # the K separate models, trained in place by ``steps``
    steps: list  # their stages' steps (`rnp_fast.learning`)
    fused: nn.Module  # the fused array, trained in place by ``fused_step``
    fused_step: object

    def step_separately(self, images: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        for step, x, y in zip(self.steps, images, labels, strict=True):
            step(x, y)

    def step_fused(self, images: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        self.fused_step(stack_batches(images), stack_labels(labels))

    def differences(self) -> dict[str, float]:
        """Largest absolute difference between the fused array's models and the separate ones:
        over learned parameters (weights, masks) and over BatchNorm running statistics."""
        worst = {"parameters": 0.0, "running_stats": 0.0}
        for model, state in zip(self.models, unfuse(self.fused, self.models), strict=True):
            learned = {name for name, _ in model.named_parameters()}
            for key, value in model.state_dict().items():
                if key.endswith("num_batches_tracked"):
                    continue
                kind = "parameters" if key in learned else "running_stats"
                difference = (value.double() - state[key].double()).abs().max().item()
                worst[kind] = max(worst[kind], difference)
        return worst


def step_array(stage: str, k: int, arch: str, width: float, engine, batch_size: int, device, seed: int = 0):
    """`StepArray` of ``k`` models of ``arch`` at ``width`` (10 classes), seeds seed..seed+k-1, for
    ``stage`` "unlearn" (every parameter, gradient ascent) or "recover" (masked BatchNorms, only
    the masks train), with the RNP defaults and ``engine`` (`rnp_fast.engine.EngineSettings`)."""
    from rnp_fast.config import RNPConfig
    from rnp_fast.learning import build_stage, recover_recipe, unlearn_recipe
    from rnp_fast.models import build_model

    recipe = unlearn_recipe(RNPConfig()) if stage == "unlearn" else recover_recipe(RNPConfig())
    norm = MaskedBatchNorm2d if stage == "recover" else nn.BatchNorm2d
    models = []
    for index in range(k):
        torch.manual_seed(seed + index)
        models.append(build_model(arch, 10, width, norm).to(device))
    fused = fuse(models)  # before the stages touch the models: the same start
    steps = [build_stage(recipe, model, engine, batch_size).step for model in models]
    fused_step = build_stage(array_recipe(recipe, k), fused, engine, batch_size).step
    return StepArray(models, steps, fused, fused_step)
