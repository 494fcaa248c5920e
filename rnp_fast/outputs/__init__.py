"""Everything rnp-fast writes goes through here: it never destroys what it did not make.

Ownership. Every directory rnp-fast makes holds a small marker file, ``.rnp-fast``, recording the
directory's kind (a defense run, a trained model, a sweep report, a sweep store) and, for each file
rnp-fast wrote into it, its size and SHA-256: a marker is a claim, the records are the proof, and
a file that no longer matches its record is the user's (``markers``). Every JSON file rnp-fast
saves carries ``"made_by": "rnp-fast"`` (and its kind).
Before any work, `vet_output` refuses (exit code 2, one line, nothing touched):

- the empty string, ``/``, the home folder, the current folder and every folder above it;
- a folder that holds a file the command reads (its model, mask file, data, sweep file);
- a path inside a folder rnp-fast made (a sweep store, a run, ...), unless the command is that
  folder's own (a sweep writing its jobs and models, ``report`` writing ``STORE/report``);
- an existing path that rnp-fast did not make, or that it made as another kind of folder;
- a folder of the right kind that holds anything its marker does not prove (the user's notes,
  plots, links, a file they edited): the first such file is named, and the user moves it out;
  rnp-fast replaces a folder only as a whole, so it never carries, and never deletes, a file of
  the user's;
- a marker rnp-fast cannot trust (damaged, foreign, of an unknown kind or format, oversized, a
  link, or naming a path outside its folder): rnp-fast cannot tell its files from the user's there;
- a folder whose write permission the user removed, and one another rnp-fast command is writing.

Markers written before they recorded proofs (format 1) count as ours only where every file is
claimed and looks like what rnp-fast writes under its name (``old_markers``).

Atomic runs. A run directory is written into a hidden staging directory beside the target and
renamed into place only when the run has finished: an interrupted or failed run leaves the
complete previous result or nothing. A writer holds a lock on its staging directory while it
lives, and the short steps that touch the target's parent (cleaning up, committing) hold a lock on
the parent, so two commands racing into one target never interleave: the second is refused. What a
killed run leaves beside the target (its staging directory, or the previous result moved aside
mid-swap) is cleaned up, or put back, by the next run into the same target, and only when its
writer is gone and its marker proves every entry in it (``leftovers``); never by name alone.

Operating-system errors on output (name too long, permission denied, read-only file system, no
space left, busy) become one line naming the path and the reason: exit code 2 before the work,
1 during it; the staging directory is removed and the previous result stays intact.

Modules: ``markers`` (the marker: a folder's kind and the proof of rnp-fast's files in it),
``old_markers`` (folders from before markers recorded proofs), ``vetting`` (an
output path checked before any work), ``run_directory`` (a run written atomically),
``leftovers`` (what runs leave beside an output), ``locks``, ``results`` (JSON result files, and
the one way rnp-fast writes JSON), ``errors``.
"""

from rnp_fast.outputs.errors import OutputError, os_error
from rnp_fast.outputs.locks import process_alive
from rnp_fast.outputs.markers import (
    DEFENSE_RUN,
    MADE_BY,
    MARKER,
    SWEEP_REPORT,
    SWEEP_STORE,
    TRAINED_MODEL,
    is_ours,
)
from rnp_fast.outputs.results import (
    BENCH_RESULT,
    PROBE_RESULT,
    is_our_json,
    json_text,
    refuse_other_json_kind,
    save_json,
    vet_json_result,
)
from rnp_fast.outputs.run_directory import RunDirectory
from rnp_fast.outputs.vetting import claim_directory, is_rnp_fast_folder, vet_output, vet_output_file, writing_inside

__all__ = [
    "DEFENSE_RUN",
    "MADE_BY",
    "MARKER",
    "SWEEP_REPORT",
    "SWEEP_STORE",
    "TRAINED_MODEL",
    "OutputError",
    "RunDirectory",
    "claim_directory",
    "is_our_json",
    "is_ours",
    "is_rnp_fast_folder",
    "json_text",
    "os_error",
    "process_alive",
    "refuse_other_json_kind",
    "save_json",
    "vet_output",
    "vet_output_file",
    "vet_json_result",
    "BENCH_RESULT",
    "PROBE_RESULT",
    "writing_inside",
]
