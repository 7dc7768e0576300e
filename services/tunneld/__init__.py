"""vpnr tunneld."""
