"""``python -m dp_ops``: the ``dpops`` command line (:mod:`dp_ops.cli`)."""

from dp_ops.cli import main

main()
