"""Evaluation, in one place: everything that scores a model or a pruning candidate.

- ``test_sets``: the clean and poisoned test sets on the evaluation device;
- ``predict``: logits of a model over uint8 images, normalised per batch;
- ``metrics``: accuracies, ASR, robust accuracy, losses and DER from those logits;
- ``evaluators``: ``evaluator(model) -> Metrics`` for one model (fast or reference mode);
- ``scoring``: every pruning candidate of a schedule scored (batched, sequential, reference);
- ``candidates``: the batched way, all candidates folded into the batch dimension.
"""
