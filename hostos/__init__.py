"""Host-OS helpers below both programs and the factory library: process identity, mounts, locks.

Nothing here knows about VMs; `factory/`, `vmcache/` and `runtime/` all import from it, never the
reverse.
"""
