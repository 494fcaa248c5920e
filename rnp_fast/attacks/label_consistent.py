"""Label-consistent backdoor (Turner et al. 2019): poisoned images keep their true (target) label.

A clean-label attack only works if the network cannot classify the poisoned target-class images
from their content, otherwise it has no reason to learn the trigger. So, before the trigger is
stamped, each poisoned image is pushed away from its own class by an untargeted L-inf PGD attack
on a clean model (trained by `train-backdoor` for this purpose):

    delta_0 = 0;  delta_{t+1} = clip_eps(delta_t + step * sign(grad_delta CE(f(x + delta_t), y)))
    with x + delta kept inside 0..255, and the result rounded to uint8.

Units are intensity levels (eps = 8 is 8/255). With an integer eps, rounding x + delta (x an
integer) keeps |x' - x| <= eps. The trigger is then the four-corner pattern; at test time it is
stamped on unperturbed images like any other trigger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.attacks.badnets import FOUR_CORNER, PatchTrigger
from rnp_fast.attacks.blend import round_to_uint8
from rnp_fast.loaders.augment import normalisation


class LabelConsistentTrigger(PatchTrigger):
    """The four-corner stamp, plus the PGD settings `train-backdoor` uses to harden the images."""

    needs_clean_model = True  # train-backdoor trains a clean model first and calls `perturb`

    def __init__(self, eps: float = 8.0, step_size: float | None = None, steps: int = 10, clean_epochs: int = 10):
        # Madry et al.'s rule of thumb: steps of 2.5 eps / steps can cross the ball and come back.
        step_size = 2.5 * eps / steps if step_size is None else step_size
        if not 0 < eps <= 255 or step_size <= 0 or steps < 1 or clean_epochs < 1:
            message = "label-consistent needs 0 < eps <= 255, step_size > 0, steps >= 1 and clean_epochs >= 1"
            raise ValueError(f"{message}, got {eps=}, {step_size=}, {steps=}, {clean_epochs=}")
        super().__init__(FOUR_CORNER, name="label-consistent")
        self.eps, self.step_size, self.steps, self.clean_epochs = float(eps), float(step_size), int(steps), clean_epochs

    def perturb(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, batch_size=256):
        """uint8 [N, C, H, W] adversarial versions of ``images`` (on their device) against ``model``."""
        parts = [
            pgd_linf(model, images[i : i + batch_size], labels[i : i + batch_size], mean, std, self)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts) if parts else images


def pgd_linf(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, settings) -> torch.Tensor:
    """Untargeted L-inf PGD from delta = 0 in pixel units; returns uint8. Model weights are untouched."""
    was_training = model.training
    model.eval()  # running statistics, not the perturbed batch's, decide the prediction
    mean, std = (t.view(1, -1, 1, 1) for t in normalisation(mean, std, images.device))
    clean = images.float()
    delta = torch.zeros_like(clean)
    for _ in range(settings.steps):
        delta.requires_grad_(True)
        logits = model(((clean + delta) / 255.0 - mean) / std)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), delta)
        with torch.no_grad():
            delta = (delta + settings.step_size * grad.sign()).clamp(-settings.eps, settings.eps)
            delta = (clean + delta).clamp(0, 255) - clean  # stay a valid image
    model.train(was_training)
    return round_to_uint8(clean + delta.detach())


def label_consistent_trigger(eps=8.0, step_size=None, steps=10, clean_epochs=10) -> LabelConsistentTrigger:
    return LabelConsistentTrigger(eps=eps, step_size=step_size, steps=steps, clean_epochs=clean_epochs)
