"""CPU evidence for the per-epoch report's precision: fp32 against bf16 on the demo defense.

The per-epoch report scores both test sets of the demo defense (bundled backdoored model, digits,
BadNets) after every epoch; nothing is chosen from it. On CPUs with AMX bf16 units the engine runs
it in bf16 under ``--amp auto``. This times that pass both ways (the engine's evaluation batch and
layout), medians of ``--repeats``, and says how far the two agree: accuracies, ASR, and the
largest logit difference. JSON with the device, CPU, versions, date and command:

    python benchmarks/bench_eval_precision.py --out benchmarks/results/eval_precision_demo_cpu.json
"""

from __future__ import annotations

import torch

from rnp_fast import harness
from rnp_fast.demo import demo_checkpoint
from rnp_fast.engine import cpu_has_amx_bf16
from rnp_fast.evaluation.predict import model_outputs

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    args = harness.parser(__doc__, repeats=5).parse_args()
    _, run = harness.demo_run(device="cpu", amp="off")  # fp32 everywhere: both precisions set here
    model = run.load_model(str(demo_checkpoint())).eval()
    tests, rows, layout = run.tests, run.eval_batch, run.engine.eval_channels_last
    passes = {name: lambda amp=amp: model_outputs(model, tests, rows, layout, amp) for name, amp in PRECISIONS.items()}
    timings = {name: harness.measure(one_pass, args.repeats) for name, one_pass in passes.items()}
    outputs = {name: one_pass() for name, one_pass in passes.items()}
    medians = {name: timing["median_s"] for name, timing in timings.items()}
    result = {
        "benchmark": "per-epoch report, fp32 vs bf16 (demo defense's test sets)",
        "cpu_has_amx_bf16": cpu_has_amx_bf16(),
        "images": len(tests.clean.images) + len(tests.poisoned.images),
        "timings": timings,
        **harness.ratios(medians, "bf16"),
        "agreement": agreement(outputs["fp32"], outputs["bf16"]),
    }
    harness.write_result(result, args.out, run.device, echo=True)


def agreement(fp32, bf16) -> dict:
    pairs = [(fp32.clean_logits, bf16.clean_logits), (fp32.poisoned_logits, bf16.poisoned_logits)]
    return {
        "predictions_equal": [int((a.argmax(1) == b.argmax(1)).sum()) for a, b in pairs],
        "images": [len(a) for a, _ in pairs],
        "max_logit_difference": max(float((a - b).abs().max()) for a, b in pairs),
    }


if __name__ == "__main__":
    harness.run(main)
