"""Signaling: the protocol, typed ids, room state (pure) and the WebSocket hub."""
