"""`lima-lightning report` (see `command` for its usage and `--help`). The CLI calls `main(argv)`.

One module per job: `reading` (run specs, predictions, TensorBoard loss curves, the fit run behind a predict run),
`statistics` (pure functions), `plotting` (PNG figures), `rendering` (markdown and HTML), `command` (argparse).
"""

from lima_lightning.report.command import main

__all__ = ["main"]
