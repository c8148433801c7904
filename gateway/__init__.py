"""A protocol gateway: listeners turn traffic into messages, routes decide, destinations deliver."""

__version__ = "0.1.0"
