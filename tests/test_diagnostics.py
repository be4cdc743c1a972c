"""The edge's diagnostics routes exist only when asked for, refuse bad input with 400 and never allocate without
bound; the edge's queue of early ICE candidates is bounded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tilemesh.edge import link as edge_link
from tilemesh.server.app import ServerConfig, create_app

ROOM = "r" * 22


@pytest.fixture
def make_client(aiohttp_client, tmp_path):
    async def make(**config):
        return await aiohttp_client(create_app(ServerConfig(static_dir=tmp_path / "static", **config)))

    return make


async def test_diagnostics_routes_exist_only_under_the_flag(make_client):
    # The read route told anyone holding a room id the edge's peer ids and link stats; the send route made the
    # server allocate and push test tensors. Normal serving has neither.
    plain = await make_client(edge_peer=True)
    assert (await plain.get("/diag/mesh")).status == 404
    assert (await plain.get(f"/diag/mesh/edge/{ROOM}")).status == 404
    assert (await plain.post(f"/diag/mesh/edge/{ROOM}/send", json={"to": "pabcdef"})).status in (404, 405)

    diag = await make_client(diagnostics=True)
    assert (await diag.get("/diag/mesh")).status == 200
    assert (await diag.get(f"/diag/mesh/edge/{ROOM}")).status == 404  # the edge is off: said so, as JSON


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    b'{"shape": [4, 4]}',                                   # no target
    b'{"to": "pabcdef", "shape": ["x"]}',
    b'{"to": "pabcdef", "shape": [0, 4]}',
    b'{"to": "pabcdef", "shape": [-1]}',
    b'{"to": "pabcdef", "shape": [1.5]}',
    b'{"to": "pabcdef", "shape": [1, 1, 1, 1, 1]}',
    b'{"to": "pabcdef", "shape": 7}',
    b'{"to": "pabcdef", "shape": [4096, 4096, 4]}',         # 64 MB: the probe's allocation per call
    b'{"to": "pabcdef", "shape": [4, 4], "seed": "x"}',
    b'{"to": "pabcdef", "shape": [4, 4], "frame": 1e300}',
    b'{"to": 5, "shape": [4, 4]}',
])
async def test_send_route_refuses_bad_bodies_with_400(make_client, body):
    client = await make_client(diagnostics=True)
    resp = await client.post(f"/diag/mesh/edge/{ROOM}/send", data=body,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]


async def test_send_route_with_a_good_body_and_no_edge_is_404(make_client):
    client = await make_client(diagnostics=True)
    resp = await client.post(f"/diag/mesh/edge/{ROOM}/send", json={"to": "pabcdef", "shape": [64, 56, 56]})
    assert resp.status == 404


async def test_early_ice_candidates_are_bounded():
    # A member that trickles candidates but never sends its description used to grow this list without end.
    owner = SimpleNamespace(ice_servers=[], _drop=lambda *a, **k: None, _on_data=lambda *a: None,
                            _emit_peer=lambda *a: None, _signal=lambda *a: None)
    link = edge_link.Link(owner, "pabcdef")
    try:
        cand = {"kind": "candidate", "candidate": "candidate:1 1 udp 2122260223 10.99.0.2 40000 typ host",
                "sdpMid": "0", "sdpMLineIndex": 0}
        for _ in range(10 * edge_link.MAX_EARLY_CANDIDATES):
            await link.on_signal(dict(cand))
        assert len(link._early_candidates) == edge_link.MAX_EARLY_CANDIDATES
    finally:
        await link.pc.close()
        await asyncio.sleep(0)
