"""tilemesh server: the aiohttp app (pages, signaling, rooms, planner), the aiortc edge peer and the CLI."""
