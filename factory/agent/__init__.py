"""Host-side client of the guest agent (protocols/agent/agent.proto over virtio-serial)."""
