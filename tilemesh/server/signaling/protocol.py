"""The signaling protocol, version 1: message schema, validation of client messages, builders of server messages.

Transport: one WebSocket per peer at `/ws`. Every message is one JSON text frame holding an object
`{"v": 1, "type": <type>, ...fields}`, except relayed mesh messages, which are binary frames (see Relay).
At most 64 KiB per message (`MAX_MESSAGE_BYTES`)
and 32 levels of nesting (`MAX_DEPTH`, the envelope counting as one; deeper is `bad_json`).
Unknown extra fields are ignored, so the protocol grows by adding optional fields only.

Client -> server
    join       {room, name, kind: "phone"|"laptop"|"edge", resume?: peer_id, token?: resume_token,
                relay_key?: str}
               First message on a socket. `room` must exist (rooms are created over HTTP, by a POST only:
               `POST /` from the front page's button, or `POST /api/rooms`). With `resume` + `token` (both from
               an earlier `welcome`) the socket takes over that peer: same id, its queued signals are delivered,
               nobody else sees it leave. A resume needs the token because peer ids are public to the whole room.
    state      {state: "booting"|"ready"|"busy", progress?: 0..1, detail?: str, profile?: object, name?: str}
               The peer's own status, shown in every roster. Fields left out keep their previous value
               (`ready` without `progress` sets it to 1). `detail` at most 200 characters, `name` 40,
               `profile` (cores, memory, runtime versions, benchmark results...) an object of at most 4 KiB of
               JSON nested at most 8 levels (it is stored and re-sent in every roster); otherwise `bad_state`.
    signal     {to: peer_id, data: object}
               Relayed to `to` (same room only) as `signal {from, data}`; `data` (SDP offer/answer, ICE
               candidate) is opaque to the server. If `to` is momentarily disconnected (inside its resume
               grace period) the signal is queued, bounded, and delivered when it resumes.
    broadcast  {data: object}   Relayed to every other peer of the room as `broadcast {from, data}`.
    ping       {}               Answered with `pong`. Doubles as the app-level heartbeat (see below).
    leave      {}               Leave the room now; the server closes the socket.
    plan_request {strategy?: str, devices?: [peer_id], variant?: str, exclude?: [peer_id],
                  target?: {kind: "fps"|"latency", value: number}, objective?: str, private?: bool,
                  latency_factor?: number}
               The sender (the device with the camera) asks the server's planner for a plan over the room's
               ready peers with profiles (or the listed subset), leaving out `exclude` (devices it caught
               returning wrong results, or stalling). `strategy` picks a benchmark baseline
               (single, offload, partition_offload, equal_split, fixed_grid); default "tilemesh". `variant`
               names one of the model card's variants (e.g. "heavy": the same weights at 448 px); the plan is
               made on its graph and its spec carries it. With `target` (context-aware scaling: at least
               `value` frames/s, or at most `value` s per frame) the planner picks the variant itself: the most
               accurate of the model as served and its variants with a measured `agreement` whose predicted
               figures in this room meet the target (`planning.variants`); `variant` then names the one in use,
               which a more accurate one must beat with headroom. The plan's `scaling` says what was predicted.
               With `objective` ("throughput": the most frames/s within 1.2x the fastest single-device
               latency; "latency": the fastest answer) the sender's camera becomes a stream: the room's
               devices are divided among the room's streams and each is planned as lanes
               (tilemesh.planning.streams); every stream's new `plan` goes out. `private`: camera pixels stay
               on the sender. "stop" ends the sender's stream and re-divides the room among the others.
               `latency_factor` (1 to 10, default 1.2): the throughput objective's latency bound, relative to
               the fastest single device.
    fusion     {mode: {method?: "avg"|"max", window_s?: 0.1..30} | null}
               Puts the room in multi-view fusion mode (or ends it with null): several phones look at the same
               object, each classifies its own view as usual, and the server fuses the views' class scores
               (tilemesh.runtime.fusion: the average, default, or the maximum of their softmax; each view's
               newest scores no older than `window_s`, default 2 s). Any member may set it (the host page does);
               everyone gets the new `fusion` message. A room can also be made in this mode (see pages).
    view       {scores: str, frame?: int} | {stop: true}
               One camera phone's view in a fusion room: its logits for the frame it just showed, as base64 of
               C little-endian float32 (tilemesh.runtime.fusion.encode_scores; C = the model's classes, at most
               8192), or `stop` when its camera closes (the view leaves the fusion at once). Scores that are not
               base64, not whole float32 values, of the wrong class count or not all finite are refused with
               `bad_scores` and change nothing (the view's previous scores stay); `view` in a room not fusing
               gets `not_fusing`. Every accepted view makes a `fused` message to the room.

Relay (binary frames): the server's own edge peer (`tilemesh serve --edge`) joins with the hub's per-process
`relay_key` and is marked `relay: true` in the roster. Browsers and that edge then carry their mesh messages
(wire chunks, link probes) as binary WebSocket frames through the server instead of a WebRTC data channel: the
edge is in the server anyway, and aiortc's pure-Python DTLS/SCTP costs it far more CPU per frame than a
WebSocket frame does. A frame from a client is `[n][n bytes: ASCII peer id of the receiver][payload]`; the
receiver gets `[n][sender's id][payload]`. The payload is at most `MAX_RELAY_PAYLOAD` (256 KiB, the largest
data-channel message a browser sends). Only frames to or from a relay member of the sender's room are carried
(`relay_refused` otherwise: two browsers talk over WebRTC). Errors are JSON `error`s with `ref: "relay"`:
bad_message (no valid header), not_joined, unknown_peer, too_large, relay_refused, peer_unavailable (the
receiver is reconnecting, or does not read within `relay_wait` seconds: the message is dropped; the sender's
session times the frame out and recovers as from any lost message). A sender waits while the receiver's
queue is more than half full, so a fast sender is slowed to its receiver's pace and never gets anyone dropped.

Server -> client
    welcome    {peer_id, room, peers: [roster entries], ice_servers: [RTCIceServer], resume_token,
                resumed: bool, heartbeat: seconds}
               Reply to `join`. `peers` includes the new peer itself. `resumed` is true when a `resume` was
               honoured; a fresh welcome (resumed false) after a reconnect means the old identity is gone and
               every peer connection must be rebuilt.
    roster     {peers: [{id, name, kind, state, progress, detail, profile, joined_at, connected, relay}]}
               Sent to everyone in the room after every change (join, state, leave, disconnect, resume).
               `joined_at` is Unix time in seconds; `connected` is false while the peer's socket is gone
               but it may still resume.
    signal     {from: peer_id, data: object}
    broadcast  {from: peer_id, data: object}
    peer_left  {id, reason: "leave"|"disconnected"|"timeout"|"replaced"|"too_slow"}
    plan       {plan_id, source, strategy, label, spec: {plan_id, source, cuts, splits, variant?}, devices,
                predicted_ms, timeline, candidates, variant?, lanes?, stream?}
               The planner's answer to a `plan_request`, sent to every peer of the room: devices in `devices`
               expand `spec` with tilemesh.runtime.peer and run their part; the others (the host page) show it.
               A stream's plan adds `lanes` ([{plan_id, spec, devices, weight, depth, predicted_ms, fps,
               timeline, ...}], its first lane repeated at the top level) and `stream` (objective, private,
               predicted fps and latency; see tilemesh.runtime.lanes).
    fusion     {mode: {method, window_s} | null}
               The room's fusion mode, to everyone, whenever it changes (also in `welcome` as `fusion`).
    fused      {method, window_s, top: [{index, label?, p}], views: [{peer, name, index, label?, p, support,
                weight, age_s}]}
               The fused answer over the views inside the window, to everyone, after each accepted `view` and
               whenever a view drops out (its phone left or disconnected, its camera stopped, or its newest
               scores went stale beyond the window): `top` the fused top-5, `views` each view's own top-1
               (`index`, `label`, `p`), its probability of the fused top-1 (`support`) and its `weight` in it
               (average: its share of the views' summed support; max: 1 for the view holding the maximum).
               Empty `top` and `views`: no view is inside the window.
    error      {code, message, ref?: the offending message's type}
    pong       {}

Errors (`error.code`): bad_json (malformed, or nested too deep), bad_message (not an object; a binary frame
without a relay header), bad_version, unknown_type, invalid_field, too_large, rate_limited, not_joined,
already_joined, unknown_room,
unknown_peer, room_full, server_full, bad_resume, bad_state (a `state` profile that cannot be stored),
peer_unavailable (the target is reconnecting and its queue is full), relay_refused (a binary frame between
two members neither of which is the server's edge), bad_relay_key (a `join` with a wrong relay_key), plan_failed
(no plan could be made: the
sender has no profile yet, or the planner is not available), bad_scores (a `view` whose scores cannot be fused),
not_fusing (a `view` in a room not in fusion mode). Every one leaves the connection usable, except
floods of oversized or rate-limited messages, which close it (WebSocket code 1008), and a frame above the
hard cap of 1 MiB (1009). Other close codes: 4000 the peer was resumed on
another socket (do not reconnect), 4001 missed heartbeats, 4002 no `join` within 10 s of connecting, 1000 after
`leave`, 1008 "too slow" when the socket's outbound queue is full (the client does not read: it leaves the room
at once, `peer_left` reason "too_slow", and its TCP connection is cut if the close frame cannot get through).

Connections: at most 32 WebSockets per client address and 1024 in all; an upgrade over either cap is refused
with HTTP 503 and the JSON body `{"error": "too_many_connections", "message"}` (the browser's socket then
closes with 1006 and the client retries with backoff).

Offer rule (avoids glare): the newcomer sends an offer to every peer listed in its `welcome`; peers already in
the room answer and never offer to a newcomer. The server sends the new roster to existing peers before it
sends `welcome` to the newcomer, so an existing peer always knows the newcomer before its offer arrives.

Liveness: the client sends `ping` every `welcome.heartbeat` seconds (any message counts). A peer silent for
three heartbeats is dropped (`peer_left` reason "timeout"). A socket that closes without `leave` keeps its
peer for a short grace period (a few seconds) so it can resume; after that the peer is removed
(reason "disconnected"). A room lives while it has peers and some minutes after the last one leaves.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tilemesh.runtime import fusion as fusion_rule
from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_NAME = 40
MAX_DETAIL = 200
# The profile rides in every roster, to every peer, on every change: keep it a summary, not a payload.
MAX_PROFILE_BYTES = 4096
# Nesting limits, counted in JSON containers (`{}` and `[]`), the envelope being level 1. Real messages need 4
# (a signal's SDP) to 6 (a state with a profile of per-class speeds); a stored profile is re-encoded in every
# roster, and Python's json recurses once per level, so depth is refused at the door, not when a roster is built.
MAX_DEPTH = 32
MAX_PROFILE_DEPTH = 8
# A relayed binary frame's payload (a mesh message: browsers send at most 256 KiB over a data channel).
MAX_RELAY_PAYLOAD = 256 * 1024

KINDS = ("phone", "laptop", "edge")
STATES = ("booting", "ready", "busy")
Kind = Literal["phone", "laptop", "edge"]
PeerState = Literal["booting", "ready", "busy"]

# Error codes, as constants so a typo is a NameError rather than a silent new code.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
BAD_VERSION = "bad_version"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
NOT_JOINED = "not_joined"
ALREADY_JOINED = "already_joined"
UNKNOWN_ROOM = "unknown_room"
UNKNOWN_PEER = "unknown_peer"
ROOM_FULL = "room_full"
SERVER_FULL = "server_full"
BAD_RESUME = "bad_resume"
PEER_UNAVAILABLE = "peer_unavailable"
PLAN_FAILED = "plan_failed"
RELAY_REFUSED = "relay_refused"
BAD_RELAY_KEY = "bad_relay_key"
BAD_STATE = "bad_state"
BAD_SCORES = "bad_scores"
NOT_FUSING = "not_fusing"
# Not a WebSocket message: the HTTP 503 body of an upgrade refused over the connection caps.
TOO_MANY_CONNECTIONS = "too_many_connections"
MAX_PLAN_DEVICES = 32
STRATEGY_NAMES = ("tilemesh", "single", "offload", "partition_offload", "equal_split", "fixed_grid")
OBJECTIVES = ("throughput", "latency", "stop")


class ProtocolError(Exception):
    """A message the server refuses; becomes an `error` reply."""

    def __init__(self, code: str, message: str, ref: str | None = None):
        super().__init__(message)
        self.code, self.message, self.ref = code, message, ref


# --- client -> server -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    room: RoomId
    name: str
    kind: Kind
    resume: PeerId | None = None
    token: ResumeToken | None = None
    # The server's own edge peer proves itself with the hub's per-process key; it then relays (see RELAY).
    relay_key: str | None = None


@dataclass(frozen=True)
class State:
    state: PeerState
    progress: float | None = None
    detail: str | None = None
    profile: dict | None = None
    name: str | None = None


@dataclass(frozen=True)
class Signal:
    to: PeerId
    data: dict


@dataclass(frozen=True)
class Broadcast:
    data: dict


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Leave:
    pass


@dataclass(frozen=True)
class PlanRequest:
    strategy: str = "tilemesh"
    devices: tuple[PeerId, ...] | None = None
    variant: str | None = None
    exclude: tuple[PeerId, ...] = ()
    target: tuple[str, float] | None = None  # ("fps" | "latency", value): the planner picks the variant
    objective: str | None = None  # a stream: one of OBJECTIVES
    private: bool = False
    latency_factor: float | None = None


@dataclass(frozen=True)
class FusionMode:
    """A room's multi-view fusion: the rule and the time window (tilemesh.runtime.fusion)."""

    method: str = fusion_rule.DEFAULT_METHOD
    window_s: float = fusion_rule.DEFAULT_WINDOW_S

    def public(self) -> dict:
        return {"method": self.method, "window_s": self.window_s}


@dataclass(frozen=True)
class SetFusion:
    mode: FusionMode | None


@dataclass(frozen=True, eq=False)
class View:
    scores: np.ndarray | None  # (C,) float32 logits; None with `stop`
    frame: int | None = None
    stop: bool = False


ClientMessage = Join | State | Signal | Broadcast | Ping | Leave | PlanRequest | SetFusion | View


def type_of(message: ClientMessage) -> str:
    """The wire `type` of a parsed message (for `error.ref`)."""
    names = {PlanRequest: "plan_request", SetFusion: "fusion"}
    return names.get(type(message), type(message).__name__.lower())


def _reject_constant(name: str):
    # Python's json accepts NaN and Infinity; browsers' JSON.parse does not, so relaying them would break peers.
    raise ValueError(f"{name} is not valid JSON")


def parse(text: str | bytes) -> ClientMessage:
    """Decode and validate one client frame; raises ProtocolError with the code the client should see."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(TOO_LARGE, f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    # The decoder recurses once per level; bracket nesting is checked first, so no input reaches its limit.
    if _bracket_depth(text) > MAX_DEPTH:
        raise ProtocolError(BAD_JSON, f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_JSON, f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, "a message must be a JSON object")
    mtype = obj.get("type")
    ref = mtype if isinstance(mtype, str) and len(mtype) <= 32 else None
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError(BAD_VERSION,
                            f"unsupported protocol version {obj.get('v')!r}; this server speaks v{VERSION}", ref)
    parser = _PARSERS.get(mtype) if isinstance(mtype, str) else None
    if parser is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {mtype!r}", ref)
    try:
        return parser(obj)
    except ValueError as exc:
        raise ProtocolError(INVALID_FIELD, f"{mtype}: {exc}", ref) from None


_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _bracket_depth(text: str | bytes) -> int:
    """The deepest nesting of `[`/`{` outside JSON strings (an upper bound of the decoded depth; malformed text
    is left to the decoder). Linear time, no recursion."""
    data = text.encode() if isinstance(text, str) else text
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(data):
        c = m.group()[:1]
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value in containers (a scalar is 0, `{}` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def _text(obj: dict, key: str, limit: int, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    # Control characters in a name would let one peer garble another's screen.
    value = "".join(ch for ch in value if ch.isprintable()).strip()
    if len(value) > limit:
        raise ValueError(f"{key!r} is longer than {limit} characters")
    return value


def _object(obj: dict, key: str, *, required: bool) -> dict | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} must be an object")
    return value


def _parse_id(cls, obj: dict, key: str, *, required: bool):
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    try:
        return cls.parse(value)
    except ValueError:
        raise ValueError(f"{key!r} is not a valid {cls.__name__}") from None


def _parse_join(obj: dict) -> Join:
    room = _parse_id(RoomId, obj, "room", required=True)
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ValueError(f"'kind' must be one of {', '.join(KINDS)}")
    name = _text(obj, "name", MAX_NAME, required=True)
    resume = _parse_id(PeerId, obj, "resume", required=False)
    token = _parse_id(ResumeToken, obj, "token", required=False)
    relay_key = obj.get("relay_key")
    if relay_key is not None and (not isinstance(relay_key, str) or not 0 < len(relay_key) <= 128):
        raise ValueError("'relay_key' must be a string of 1 to 128 characters")
    return Join(room=room, name=name or "", kind=kind, resume=resume, token=token, relay_key=relay_key)


def _parse_state(obj: dict) -> State:
    state = obj.get("state")
    if state not in STATES:
        raise ValueError(f"'state' must be one of {', '.join(STATES)}")
    progress = obj.get("progress")
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, int | float) or not math.isfinite(progress) \
                or not 0 <= progress <= 1:
            raise ValueError("'progress' must be a number from 0 to 1")
        progress = float(progress)
    return State(
        state=state,
        progress=progress,
        detail=_text(obj, "detail", MAX_DETAIL),
        profile=_profile(obj),
        name=_text(obj, "name", MAX_NAME),
    )


def _profile(obj: dict) -> dict | None:
    """The profile is stored and re-sent in every roster: refuse what could not be stored safely (`bad_state`)."""
    value = obj.get("profile")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(BAD_STATE, "state: 'profile' must be an object", "state")
    if json_depth(value) > MAX_PROFILE_DEPTH:
        raise ProtocolError(BAD_STATE, f"state: 'profile' is nested deeper than {MAX_PROFILE_DEPTH} levels", "state")
    if len(json.dumps(value, separators=(",", ":")).encode()) > MAX_PROFILE_BYTES:
        raise ProtocolError(BAD_STATE, f"state: 'profile' is larger than {MAX_PROFILE_BYTES} bytes", "state")
    return value


def _parse_signal(obj: dict) -> Signal:
    return Signal(to=_parse_id(PeerId, obj, "to", required=True), data=_object(obj, "data", required=True))


def _parse_broadcast(obj: dict) -> Broadcast:
    return Broadcast(data=_object(obj, "data", required=True))


def _parse_plan_request(obj: dict) -> PlanRequest:
    strategy = obj.get("strategy", "tilemesh")
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"'strategy' must be one of {', '.join(STRATEGY_NAMES)}")
    lists = {}
    for name in ("devices", "exclude"):
        ids = obj.get(name)
        if ids is not None:
            if not isinstance(ids, list) or len(ids) > MAX_PLAN_DEVICES:
                raise ValueError(f"'{name}' must be a list of at most {MAX_PLAN_DEVICES} peer ids")
            try:
                ids = tuple(PeerId.parse(d) for d in ids)
            except ValueError:
                raise ValueError(f"'{name}' holds an invalid peer id") from None
        lists[name] = ids
    variant = obj.get("variant")
    if variant is not None and not (isinstance(variant, str) and 0 < len(variant) <= 32):
        raise ValueError("'variant' must be a model variant's name (a short string)")
    target = obj.get("target")
    if target is not None:
        ok = isinstance(target, dict) and set(target) == {"kind", "value"} and target["kind"] in ("fps", "latency")
        value = target.get("value") if isinstance(target, dict) else None
        if not ok or isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e4:
            raise ValueError("'target' must be {kind: 'fps' | 'latency', value: a positive number}")
        target = (target["kind"], float(value))
    objective = obj.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"'objective' must be one of {', '.join(OBJECTIVES)}")
    private = obj.get("private", False)
    if not isinstance(private, bool):
        raise ValueError("'private' must be true or false")
    factor = obj.get("latency_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | float)
                               or not 1.0 <= factor <= 10.0):
        raise ValueError("'latency_factor' must be a number from 1 to 10")
    return PlanRequest(strategy=strategy, devices=lists["devices"], variant=variant, exclude=lists["exclude"] or (),
                       target=target, objective=objective, private=private,
                       latency_factor=None if factor is None else float(factor))


def fusion_mode(value) -> FusionMode | None:
    """A fusion mode as a client writes it (`{method?, window_s?}`, or null for none); ValueError saying what is
    wrong. Shared by the `fusion` message and room creation over HTTP."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("'mode' must be {method?: 'avg' | 'max', window_s?: seconds} or null")
    method = value.get("method", fusion_rule.DEFAULT_METHOD)
    if method not in fusion_rule.METHODS:
        raise ValueError(f"'method' must be one of {', '.join(fusion_rule.METHODS)}")
    window = value.get("window_s", fusion_rule.DEFAULT_WINDOW_S)
    lo, hi = fusion_rule.WINDOW_RANGE_S
    if isinstance(window, bool) or not isinstance(window, int | float) or not lo <= window <= hi:
        raise ValueError(f"'window_s' must be a number of seconds from {lo:g} to {hi:g}")
    return FusionMode(method=method, window_s=float(window))


def _parse_fusion(obj: dict) -> SetFusion:
    if "mode" not in obj:
        raise ValueError("missing field 'mode' (an object, or null to end fusion)")
    return SetFusion(fusion_mode(obj["mode"]))


def _parse_view(obj: dict) -> View:
    if obj.get("stop") is True:
        return View(scores=None, stop=True)
    frame = obj.get("frame")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ValueError("'frame' must be a non-negative integer")
    if "scores" not in obj:
        raise ProtocolError(BAD_SCORES, "view: missing 'scores' (or send {stop: true})", "view")
    try:
        scores = fusion_rule.decode_scores(obj["scores"])
    except ValueError as exc:
        raise ProtocolError(BAD_SCORES, f"view: {exc}", "view") from None
    return View(scores=scores, frame=frame)


_PARSERS = {
    "fusion": _parse_fusion,
    "view": _parse_view,
    "join": _parse_join,
    "state": _parse_state,
    "signal": _parse_signal,
    "broadcast": _parse_broadcast,
    "ping": lambda obj: Ping(),
    "leave": lambda obj: Leave(),
    "plan_request": _parse_plan_request,
}


# --- server -> client -------------------------------------------------------------------------------------


def _msg(mtype: str, **fields: Any) -> dict:
    return {"v": VERSION, "type": mtype, **fields}


def welcome(peer_id: PeerId, room: RoomId, peers: list[dict], ice_servers: list[dict], resume_token: ResumeToken,
            resumed: bool, heartbeat: float, fusion: FusionMode | None = None) -> dict:
    return _msg("welcome", peer_id=peer_id, room=room, peers=peers, ice_servers=ice_servers,
                resume_token=resume_token, resumed=resumed, heartbeat=heartbeat,
                fusion=None if fusion is None else fusion.public())


def fusion(mode: FusionMode | None) -> dict:
    return _msg("fusion", mode=None if mode is None else mode.public())


def fused(fields: dict) -> dict:
    """The fused answer of a fusion room (fields built by tilemesh.server.signaling.rooms.fused_fields)."""
    return _msg("fused", **fields)


def roster(peers: list[dict]) -> dict:
    return _msg("roster", peers=peers)


def signal_from(sender: PeerId, data: dict) -> dict:
    return _msg("signal", **{"from": sender, "data": data})


def broadcast_from(sender: PeerId, data: dict) -> dict:
    return _msg("broadcast", **{"from": sender, "data": data})


def peer_left(peer_id: PeerId, reason: str) -> dict:
    return _msg("peer_left", id=peer_id, reason=reason)


def plan(fields: dict) -> dict:
    """The planner's answer (fields built by tilemesh.server.inference)."""
    return _msg("plan", **fields)


def error(code: str, message: str, ref: str | None = None) -> dict:
    fields = {"code": code, "message": message}
    if ref is not None:
        fields["ref"] = ref
    return _msg("error", **fields)


def pong() -> dict:
    return _msg("pong")


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def relay_frame(peer_id: str, payload: bytes | bytearray | memoryview) -> bytes:
    """A relayed binary frame: `[n][n bytes of ASCII peer id][payload]` (to the receiver, or from the sender)."""
    ident = peer_id.encode("ascii")
    if not 0 < len(ident) < 256:
        raise ValueError(f"peer id of {len(ident)} bytes cannot head a relay frame")
    return bytes((len(ident),)) + ident + bytes(payload)


def parse_relay_frame(data: bytes) -> tuple[str, memoryview]:
    """(peer id, payload view) of a relayed binary frame; ProtocolError `bad_message` when it has no valid header."""
    if len(data) < 2 or len(data) < 1 + data[0] or data[0] == 0:
        raise ProtocolError(BAD_MESSAGE, "a binary frame starts with [n][n-byte peer id]", "relay")
    n = data[0]
    try:
        peer = bytes(data[1:1 + n]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(BAD_MESSAGE, "a binary frame's peer id must be ASCII", "relay") from None
    return peer, memoryview(data)[1 + n:]
