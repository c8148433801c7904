"""HTTP: the web hook destination (and the http listener and reverse proxy)."""
