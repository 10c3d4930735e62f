"""Layer 3: ``qsnap revert``, a snapshot image fed back to QEMU by precopy or postcopy.

See docs/architecture.md for the modules and their contracts; ``command`` is the CLI
plug-in, ``precopy.revert_precopy`` and ``postcopy.PostcopySender`` the pipelines.
"""
