"""The version `kata-runtime version` and `kata-runtime env` show."""

RUNTIME_VERSION = "0.1.0"
