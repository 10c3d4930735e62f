"""qsnap's testing library: drive real QEMU guests and check snapshots of them.

Modules: `qemu` (finding QEMU, probes), `qmp` (synchronous QMP), `vm` (the VM class),
`memory` (memory references and comparison), `analyze` (QEMU's analyze-migration.py and
device-state comparison), `filters` (deterministic log output for golden tests).
"""
