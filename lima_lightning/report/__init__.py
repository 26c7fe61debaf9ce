"""`lima-lightning report` (its usage and `--help`: `command`'s docstring). The CLI calls `main(argv)`.

One module per job:
  - `reading`: a run's files (predictions, samples, validation.jsonl, TensorBoard scalars, config.yaml), rows checked;
  - `loading`: `--run NAME=PATH` specs to columns, checked to be comparable; `epochs`: `--epochs`, a fit run's epochs;
  - `statistics`: pure functions (n-gram rates, matching, the bootstrap); `figures`: each run's figures with intervals;
  - `tables`: what the tables say; `plotting`: the PNGs; `rendering`: markdown and HTML; `command`: argparse, writing.
"""

from lima_lightning.report.command import main

__all__ = ["main"]
