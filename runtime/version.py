"""Versions shown by `kata-runtime version` and recorded in template metadata."""

RUNTIME_VERSION = "0.1.0"
