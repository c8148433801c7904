"""FTP (RFC 959, 2428, 3659, 4217): a listener for uploads and downloads."""
