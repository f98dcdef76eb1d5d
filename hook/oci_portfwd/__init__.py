"""oci-portfwd-hook: publish container ports on the host from an OCI runtime hook."""

__version__ = "0.1.0"
