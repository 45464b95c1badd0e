"""The real fleet: device processes over a quorum (torchft or torchrun elastic), the
coordinator and its handlers (sealed payloads, split learning's rear)."""
