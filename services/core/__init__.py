"""vpnr core."""
