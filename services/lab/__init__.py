"""vpnr lab."""
