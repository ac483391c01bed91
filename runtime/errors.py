"""kata-runtime's own error root, beside the factory library's FactoryError.

Every user-facing failure is one of these or a FactoryError, printed as one line
`kata-runtime: <message>` with no traceback.
"""


class KataRuntimeError(Exception):
    """A command of kata-runtime cannot do what was asked; the message names the bad value."""
