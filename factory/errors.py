"""The factory's one exception hierarchy. Messages name the bad value and what to do."""


class FactoryError(Exception):
    """Base of every error the factory raises on purpose."""


class ConfigError(FactoryError):
    """A configuration value is missing or invalid."""


class HypervisorError(FactoryError):
    """QEMU could not be started, driven or stopped."""


class BootError(HypervisorError):
    """QEMU exited, or the guest never came up, while a VM was starting."""


class HypervisorTimeoutError(HypervisorError):
    """QEMU did not answer within a bounded time."""


class TemplateError(FactoryError):
    """A VM template is missing, incomplete, or does not match the config."""


class AgentError(FactoryError):
    """The guest agent refused a request or the channel to it failed."""


class AgentTimeoutError(AgentError):
    """The guest agent did not answer within a bounded time."""


class AgentUnsupportedError(AgentError):
    """The guest agent is older than the request (it answered "unsupported request")."""
