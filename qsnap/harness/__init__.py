"""qsnap's testing library: drive real QEMU guests and check snapshots of them.

Modules: `qemu` (finding QEMU, probes with skip reasons), `qmp` (synchronous QMP),
`vm` (the VM class and `VMFactory`), `firmware` (a halting BIOS for deterministic
memory), `memory` (memory references and comparison), `analyze` (QEMU's
analyze-migration.py and device-state comparison), `filters` (deterministic log output
for golden tests); `guests` and `sweep` hold the guest images and their checks;
`scenario` builds `exec:qsnap` URIs and save scenarios, `tmpfs` gives a private tmpfs.
"""
