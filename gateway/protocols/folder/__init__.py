"""The ``folder`` destination: a local folder that serves files by name (TFTP reads) and
that uploads are saved into."""
