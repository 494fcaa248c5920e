"""Score many pruning candidates in one pass over the data.

The sequential way evaluates every candidate with its own pass: load the pruned weights, run all
test images. Here each batch of images goes through the network once for a whole chunk of
candidates: the candidates are folded into the batch dimension (``[G*B, C, H, W]``) and every
BatchNorm prunes each slice's own channels. In eval mode a pruned channel (gamma = 0) outputs its
bias, whatever its input, so no weights are copied per candidate: the convolutions and BatchNorms
run once on the folded batch and each group's pruned channels are then set to their bias.

Prefix sharing: the model is a chain of stages (`models.stages`). Candidates that prune the same
channels in the first k stages have the same activations there, so they form one group until the
first stage where they differ, and the group is split (its rows repeated) only then. A threshold
schedule prunes deep layers first, so most of the network runs once per batch, not once per
candidate.

Candidates with identical prune sets are scored once. Chunks of candidates are sized from free
memory (or a fixed ``chunk_size``); running out of memory halves the chunk and starts the pass
again, with a warning, instead of failing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.engine import autocast, raise_recompile_limit
from rnp_fast.evaluation.predict import model_input
from rnp_fast.models.stages import Stage, model_stages, stage_of_module
from rnp_fast.runlog import Progress

PruneSet = frozenset  # of (BatchNorm module name, channel index)
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
LIVE_TENSORS_PER_STAGE = 6  # a residual block keeps about this many activations alive at once
CPU_ROWS_PER_BATCH = 4  # candidate-image rows per forward on CPU, in sequential batches (row_budget)


class CandidateNorm(nn.Module):
    """Eval-mode BatchNorm2d over G groups of B images, each group with its own pruned channels
    (see the module docstring for the exact and the folded way)."""

    def __init__(self, norm: nn.BatchNorm2d, folded: bool = False):
        super().__init__()
        self.norm, self.folded = norm, folded
        self.rows: torch.Tensor | None = None  # exact: sample index of every pruned (sample, channel) pair
        self.channels: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # folded: [G, 1, C, 1, 1] per-group scale and shift
        self.shift: torch.Tensor | None = None

    def use(self, entries) -> None:
        if self.folded:
            self.scale, self.shift = entries
        else:
            self.rows, self.channels = entries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded_forward(x) if self.folded else self.exact_forward(x)

    def exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        y = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        if self.rows is not None:
            y[self.rows, self.channels] = norm.bias[self.channels].to(y.dtype)[:, None, None]
        return y

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.scale.shape[0]
        y = x.unflatten(0, (groups, -1)).float() * self.scale + self.shift
        return y.flatten(0, 1).to(x.dtype)

    def folded_terms(self, pruned: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[G, 1, C, 1, 1] scale and shift: BatchNorm's eval-mode linear terms with each group's
        pruned channels given gamma = 0 (scale 0, shift = bias)."""
        norm = self.norm
        keep = torch.ones(len(pruned), norm.num_features, device=norm.weight.device)
        for group, indices in enumerate(pruned):
            keep[group, indices] = 0.0
        scale = keep * (norm.weight * torch.rsqrt(norm.running_var + norm.eps)).float()
        shift = norm.bias.float() - norm.running_mean.float() * scale
        return scale[:, None, :, None, None], shift[:, None, :, None, None]


def pruned_entries(pruned: list[torch.Tensor], batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sample, channel) index pairs to overwrite: ``pruned[g]`` holds the channels group g prunes,
    and the input holds the groups one after the other, ``batch`` rows each."""
    rows, channels = [], []
    for group, indices in enumerate(pruned):
        if len(indices):
            samples = torch.arange(group * batch, (group + 1) * batch, device=indices.device)
            rows.append(samples.repeat_interleave(len(indices)))
            channels.append(indices.repeat(batch))
    return (torch.cat(rows), torch.cat(channels)) if rows else (None, None)


@dataclass
class StagePlan:
    parent: torch.Tensor | None  # per group of this stage, its group before it (None: unchanged)
    pruned: dict[str, list[torch.Tensor]]  # BatchNorm name -> pruned channel indices of each group
    entries: dict[int | None, dict[str, tuple]] = field(default_factory=dict)  # see entries_for

    def entries_for(self, batch: int | None, norms: dict[str, CandidateNorm]) -> dict[str, tuple]:
        """What each BatchNorm of the stage needs, built once: exact entries per batch size, or
        folded terms (``batch`` None: the same for every batch size)."""
        if batch not in self.entries:
            self.entries[batch] = {
                name: norms[name].folded_terms(groups) if batch is None else pruned_entries(groups, batch)
                for name, groups in self.pruned.items()
            }
        return self.entries[batch]


@dataclass
class ChunkPlan:
    stages: list[StagePlan]
    group_of_candidate: list[int]  # row of the final output holding each candidate's logits


class CandidateNetwork:
    """One copy of the model (never one per candidate) with every BatchNorm made a CandidateNorm."""

    def __init__(self, model: nn.Module, channels_last: bool = False, compile_backend: object | None = None):
        """``compile_backend``: compile every stage with it (``"inductor"`` on the GPU) and fold the
        pruning into the BatchNorms' scale and shift; None: eager, exact."""
        self.net = copy.deepcopy(model).eval()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.folded = compile_backend is not None
        self.norms: dict[str, CandidateNorm] = {}
        for name, module in list(self.net.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                self.norms[name] = CandidateNorm(module, self.folded)
                self.net.set_submodule(name, self.norms[name])
        self.stages: list[Stage] = model_stages(self.net)
        self.runs = [compiled_stage(stage.run, compile_backend) for stage in self.stages]
        self.stage_of_norm = {name: stage_of_module(self.stages, name) for name in self.norms}
        self.device = next(self.net.parameters()).device

    def plan(self, prune_sets: Sequence[PruneSet]) -> ChunkPlan:
        """Group the candidates stage by stage: same group so far and same prune set in this stage."""
        group = [0] * len(prune_sets)
        plans = []
        for number in range(len(self.stages)):
            in_stage = [frozenset(c for c in chosen if self.stage_of_norm[c[0]] == number) for chosen in prune_sets]
            keys: dict[tuple, int] = {}
            parents, members = [], []
            for candidate, (previous, pruned) in enumerate(zip(group, in_stage, strict=True)):
                if (previous, pruned) not in keys:
                    keys[previous, pruned] = len(parents)
                    parents.append(previous)
                    members.append(candidate)
                group[candidate] = keys[previous, pruned]
            unchanged = parents == list(range(len(parents)))
            parent = None if unchanged else torch.tensor(parents, device=self.device)
            plans.append(StagePlan(parent, self.pruned_channels(number, [in_stage[m] for m in members])))
        return ChunkPlan(plans, group)

    def pruned_channels(self, stage: int, pruned_per_group: list[frozenset]) -> dict[str, list[torch.Tensor]]:
        """Per BatchNorm of ``stage``: the channel indices each group prunes there."""
        return {
            name: [
                torch.tensor(sorted(i for layer, i in pruned if layer == name), dtype=torch.long, device=self.device)
                for pruned in pruned_per_group
            ]
            for name in self.norms
            if self.stage_of_norm[name] == stage
        }

    @torch.no_grad()
    def forward(self, plan: ChunkPlan, x: torch.Tensor, observe: Callable[[torch.Tensor], None] | None = None):
        """Logits [G, B, K] for the final groups of ``plan`` on one normalised batch ``x``;
        ``observe`` sees every stage's output."""
        batch, groups = len(x), 1
        for run, stage_plan in zip(self.runs, plan.stages, strict=True):
            if stage_plan.parent is not None:
                x = x.unflatten(0, (groups, batch))[stage_plan.parent].flatten(0, 1)
                groups = len(stage_plan.parent)
            for name, entries in stage_plan.entries_for(None if self.folded else batch, self.norms).items():
                self.norms[name].use(entries)
            x = run(x)
            if observe is not None:
                observe(x)
        return x.float().unflatten(0, (groups, batch))


def compiled_stage(run: Callable[[torch.Tensor], torch.Tensor], backend: object | None):
    """``run`` compiled. The group count (and so the batch) varies between chunks and stages:
    dimensions become dynamic after the first change instead of compiling each size. Not
    ``fullgraph``: a model from outside the zoo is one stage and may break the graph somewhere; the
    zoo's stages compile whole (a test counts their graphs)."""
    if backend is None:
        return run
    raise_recompile_limit()
    return torch.compile(run, backend=backend)


@dataclass
class PassShape:
    candidates: int  # candidates per chunk (one plan, one forward per batch)
    images: int  # images per forward; a forward holds up to candidates * images rows


class BatchedScoring:
    """Logits of every candidate on every image set, one pass over the data.

    ``image_sets``: uint8 image tensors on the evaluation device; ``score(model, prune_sets)``
    returns, per candidate, one float32 logits tensor per image set.
    """

    def __init__(
        self,
        image_sets: Sequence[torch.Tensor],
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        chunk_size: int = 0,
        amp: torch.dtype | None = None,
        channels_last: bool = False,
        warn: Callable[[str], None] | None = None,
        compile_backend: object | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.image_sets, self.mean, self.std = list(image_sets), mean, std
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.amp, self.channels_last, self.compile_backend = amp, channels_last, compile_backend
        self.warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.progress = progress  # takes the pass's progress lines (None: silent)

    def score(
        self, model: nn.Module, prune_sets: Sequence[PruneSet], what: str = "scoring the pruning candidates"
    ) -> list[list[torch.Tensor]]:
        distinct = list(dict.fromkeys(prune_sets))  # identical prune sets are scored once
        network = CandidateNetwork(model, self.channels_last, self.compile_backend)
        shape = self.pass_shape(network, len(distinct))
        while True:
            try:
                logits = self.one_pass(network, distinct, shape, what)
                break
            except OUT_OF_MEMORY:
                if shape.candidates == 1 and shape.images == 1:
                    raise
                release_cached_memory(network.device)
                shape = halved(shape)
                self.warn(
                    f"out of memory while scoring pruning candidates; retrying with {shape.candidates} "
                    f"candidates x {shape.images} images per pass"
                )
        by_set = dict(zip(distinct, logits, strict=True))
        return [by_set[chosen] for chosen in prune_sets]

    def one_pass(self, network: CandidateNetwork, candidates: list[PruneSet], shape: PassShape, what: str = ""):
        step = shape.candidates
        chunks = [candidates[i : i + step] for i in range(0, len(candidates), step)]
        plans = [network.plan(part) for part in chunks]
        outputs: list[list[list[torch.Tensor]]] = [[[] for _ in self.image_sets] for _ in candidates]
        total = sum(len(images) for images in self.image_sets)
        progress = Progress(self.progress, f"{what}: {len(candidates)} candidates x {total} images", total)
        for set_number, images in enumerate(self.image_sets):
            for start in range(0, len(images), shape.images):
                x = self.prepare(images[start : start + shape.images])
                first = 0
                for part, plan in zip(chunks, plans, strict=True):
                    with autocast(network.device, self.amp):
                        logits = network.forward(plan, x)
                    for offset, row in enumerate(plan.group_of_candidate):
                        outputs[first + offset][set_number].append(logits[row])
                    first += len(part)
                progress.advance(len(x))
        progress.finish()
        return [[torch.cat(parts) for parts in per_set] for per_set in outputs]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(images, self.mean, self.std, self.channels_last)

    def pass_shape(self, network: CandidateNetwork, count: int) -> PassShape:
        """All candidates in one chunk unless ``chunk_size`` says otherwise, as many images per
        forward as the row budget leaves; the chunk shrinks only when not even one image fits."""
        rows = self.row_budget(network)
        candidates = min(self.chunk_size or count, max(1, rows))
        return PassShape(candidates, max(1, min(self.batch_size, rows // candidates)))

    def row_budget(self, network: CandidateNetwork) -> int:
        """Rows (candidate-images) per forward. On CPU four times the sequential batch size: a
        whole network runs slowest per image at large batches there (they fall out of cache), but
        with prefix sharing the early, large stages see only the images, not the candidates; on
        the demo defense 4x took 5.1-5.2 s against 5.9 s at 1x, 5.0-5.6 s at 2x and 6.2-6.5 s at
        8x (a rough check: two defenses per setting on a 2-core Xeon, not saved). On CUDA: half the
        free memory, counting each stage's live activations."""
        if network.device.type != "cuda":
            return CPU_ROWS_PER_BATCH * self.batch_size
        per_row = activation_bytes_per_image(network, self.prepare(self.image_sets[0][:1])) * LIVE_TENSORS_PER_STAGE
        return int(free_memory_bytes(network.device) // 2 // max(1, per_row))


def halved(shape: PassShape) -> PassShape:
    if shape.candidates > 1:
        return PassShape(max(1, shape.candidates // 2), shape.images)
    return PassShape(1, max(1, shape.images // 2))


def activation_bytes_per_image(network: CandidateNetwork, x: torch.Tensor) -> int:
    """The largest tensor one image produces at any stage (its input included)."""
    sizes = [x.numel() * x.element_size()]
    network.forward(network.plan([frozenset()]), x, observe=lambda out: sizes.append(out.numel() * out.element_size()))
    return max(sizes)


def free_memory_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
