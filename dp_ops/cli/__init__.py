"""``dpops``: the command line. Commands are thin: build a config, call the library, print what
:mod:`dp_ops.render` makes of the result.

``_app`` holds the Typer apps and what every command shares (options, choices, consoles, errors and signals
as one line and an exit code); the commands are in ``run`` (``dpops run``), ``studies`` (``theory``,
``sweep``, ``bench``, ``scaling``) and ``data`` (``data restore``, ``generator train|quality``, ``config
show``), imported here so that they are registered on :data:`app`, in the order ``dpops --help`` lists them.
Importing this package loads no heavy library: each command imports what it needs when it runs.
"""

from dp_ops.cli import data, run, studies  # noqa: F401  (registers the commands on app)
from dp_ops.cli._app import app, main

__all__ = ["app", "main"]
