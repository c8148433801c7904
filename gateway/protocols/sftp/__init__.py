"""SFTP (over SSH, with a key and a pinned host key): a destination for uploaded files."""
