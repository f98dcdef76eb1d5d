"""Errors a user can act on. The CLI prints one as a single line and exits non-zero;
anything else is a bug and goes with its traceback to the log."""


class PortfwdError(Exception):
    """Base of every user-facing error: str(error) is the whole message."""


class StateError(PortfwdError):
    """The OCI state on stdin is unusable."""


class ConfigError(PortfwdError):
    """The global config or a per-container override is invalid."""


class PortSpecError(PortfwdError):
    """A port request in the annotation cannot be parsed."""


class BindError(PortfwdError):
    """A host port could not be bound."""


class DriverError(PortfwdError):
    """The selected driver is unknown or cannot serve the plan."""


class NamespaceError(PortfwdError):
    """The container's namespaces could not be joined."""


class StartError(PortfwdError):
    """The forwarding did not come up."""


class StateDirError(PortfwdError):
    """The state directory is missing, unsafe or not ours."""
