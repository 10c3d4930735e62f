"""The machinery behind ``iotests/check``, the pytest collector and standalone runs.

Tests themselves never import this package: they import ``iotests`` (our compat module
here, QEMU's own module inside a QEMU tree), so that the same files run in both places.
"""
