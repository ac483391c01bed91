"""The guest agent: serves agent.proto requests on the virtio-serial port "agent.0".

Runs inside the VM as PID 1's only service (guest/init starts it). It imports the standard
library, protobuf and protocols.agent only: everything it imports has to be packed into the
initramfs (guest/build_initramfs.py records the import closure of guest.agent.main).
"""

AGENT_VERSION = "0.1.0"
