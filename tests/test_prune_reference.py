"""The pruning schedule and file formats against the reference's published files."""

from rnp_fast.evaluation.metrics import Metrics
from rnp_fast.prune import Channel, rank_channels, reference_thresholds, schedule, thresholds
from rnp_fast.report import format_mask_values, parse_mask_values, pruning_row, read_mask_file


def test_reference_mask_file_parses_with_our_reader(reference_file):
    channels = read_mask_file(reference_file("mask_values.txt"))
    assert len(channels) == 4800  # every BatchNorm channel of ResNet-18, shortcut BNs included
    assert channels[0] == Channel("bn1", 0, 1.0)
    assert {c.layer for c in channels} >= {"layer2.0.shortcut.1", "layer4.1.bn2"}


def test_schedule_reproduces_reference_pruning_table(reference_file):
    """Counts, named channel and threshold column of all 19 rows match the published table."""
    ranked = rank_channels(read_mask_file(reference_file("mask_values.txt")))
    steps = schedule(ranked, "threshold", 0.9, 0.05)
    rows = reference_file("pruning_by_threshold.txt").read_text().splitlines()[1:]
    assert len(steps) == len(rows) == 19
    for step, row in zip(steps, rows, strict=True):  # our table's first four columns, as written
        ours = pruning_row(step, Metrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), "threshold").split("\t")[:4]
        assert ours == row.split("\t")[:4]


def test_thresholds_are_decimals_and_the_table_prints_the_references_floats():
    values = thresholds(0.9, 0.05)
    assert len(values) == 19 and values[3] == 0.15 and repr(values[3]) == "0.15"
    assert values == [i * 5 / 100 for i in range(19)]  # the decimals i * 0.05 name (correctly rounded)
    assert [repr(v) for v in thresholds(0.9, 0.15)] == ["0.0", "0.15", "0.3", "0.45", "0.6", "0.75", "0.9"]
    reference = reference_thresholds(0.9, 0.05)
    assert repr(reference[3]) == "0.15000000000000002" and repr(reference[-1]) == "0.9"
    assert len(thresholds(0.93, 0.05)) == 19  # never beyond --pruning-max


def test_our_mask_file_parses_the_reference_way():
    """Whitespace-separated columns with one header row (the reference's reading convention)."""
    channels = [Channel("bn1", 0, 0.123456), Channel("layer2.0.shortcut.1", 3, 1.0)]
    text = format_mask_values(channels)
    header, *rows = [line.split() for line in text.splitlines()]
    assert header[0] == "No" and len(rows) == 2
    assert rows[1] == ["1", "layer2.0.shortcut.1", "3", "1.0000"]
    assert parse_mask_values(text) == [Channel("bn1", 0, 0.1235), Channel("layer2.0.shortcut.1", 3, 1.0)]


def test_ties_keep_module_order_and_number_schedule():
    channels = [Channel("a", 0, 0.5), Channel("a", 1, 0.1), Channel("b", 0, 0.1), Channel("b", 1, 0.0)]
    ranked = rank_channels(channels)
    assert [(c.layer, c.index) for c in ranked] == [("b", 1), ("a", 1), ("b", 0), ("a", 0)]
    steps = schedule(ranked, "number", 4, 2)
    assert [s.count for s in steps] == [2, 4]
    assert steps[0].last == Channel("a", 1, 0.1)
