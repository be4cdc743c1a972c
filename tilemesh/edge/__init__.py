"""The aiortc edge peer: the server (or another machine) as one more device in a room."""
