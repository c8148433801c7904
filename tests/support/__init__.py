"""What the tests share: the one fake of the gateway a listener is handed, and helpers.

Test modules import from here, never from one another.
"""
