"""vpnr auditd."""
