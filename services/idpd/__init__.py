"""vpnr idpd."""
