"""One-command reproduction of the paper's tables: `python -m mixmask.reproduce TABLE [...]` (see `__main__`).

`tables` expands a table into runs (preset + overrides), `commands` runs them or writes a SLURM array script, and
`collect` puts the measured numbers beside the published ones (`mixmask/reproduce/paper_results.yaml`).
"""
