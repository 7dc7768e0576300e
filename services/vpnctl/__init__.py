"""vpnr vpnctl."""
