"""dp_ops: Deliberate Practice for synthetic training data, as a tool you can run, track and sweep."""

__version__ = "0.12.0"
