"""vpnr policyd."""
