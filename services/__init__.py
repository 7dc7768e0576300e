"""vpnr: site-to-site VPN router with IdP-driven per-packet policy enforced in the kernel."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vpnr")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
