"""A small protocol that lives outside ``gateway/``: proof that a protocol is one package.

``echo`` is a line protocol: each line a client sends becomes a message of the
kind ``line`` (which this package brings), and the client reads ``+OK <id>``
once it is in the spool.  The ``echo-file`` destination appends each line to
a file.  The tests install it through the ``gateway.protocols`` entry point.
"""
