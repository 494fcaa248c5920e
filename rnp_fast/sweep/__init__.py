"""Sweeps: a grid of backdoored models and defenses, run anywhere, resumable, reported at the end.

- ``spec``: the YAML sweep file, checked and expanded into jobs (``job``);
- ``store``: the SQLite results store, one row per job;
- ``execute``: one job (train or reuse the backdoored model, defend it);
- ``backends``: in-process, one worker per GPU slot, or Ray; ``runner`` drives them;
- ``table``, ``curves``, ``report``: the aggregated table and plots of ``rnp-fast report``.
"""
