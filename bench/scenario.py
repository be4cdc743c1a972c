"""Benchmark scenarios: small declarative files (TOML or JSON) describing the emulated room.

    name = "default"
    source = "phone"          # the device with the camera
    model = "mobilenet_v2"
    frames = 8                # measured frames per strategy and repeat
    repeats = 2               # each repeat runs every strategy once, in a rotated order
    warmup = 2                # frames run and discarded after every strategy switch
    strategies = ["single", "tilemesh"]   # optional: default all of tilemesh.planning.planner.STRATEGIES
    variant = "heavy"         # optional: a variant of the served model (its card's `variants`), e.g. heavy mode
    ort_threads = 1           # optional: onnxruntime-web threads in every browser (default 0: the page's own choice)
    depth = 1                 # optional: frames in flight on the source (default 0: the AR loop's own tuning)
    device_counts = [2, 3, 4] # optional: measure each strategy but "single" planned over the first N devices
                              # (source first, file order) for each N, in the same run: windows "tilemesh@N"

    [[devices]]
    name = "phone"
    kind = "phone"            # phone | laptop (a Chromium each) | edge (the server's aiortc peer, at most one)
    cores = 0.5               # cgroup CPU quota, in cores
    mbps = 50                 # the device's link rate, each direction
    delay_ms = 10             # one-way delay of the device's link, each direction

A stream scenario (`bench/streams.py`) adds a `[streams]` table instead of strategies: the cameras streaming
at once, the room sizes to measure (the first k browsers of `devices`, each size a fresh room) and how long:

    [streams]
    cameras = ["phone1"]      # devices whose cameras stream (default: the source)
    sizes = [1, 2, 3, 4]      # rooms of the first k browsers (default: all of them)
    window_s = 20             # measured seconds per room, after warmup_s seconds of streaming
    warmup_s = 15
    latency_factor = 2.0      # optional: the throughput objective's latency bound (default the product's, 1.2)

A link between two devices crosses both devices' links (see bench/env.py), so a 10 ms and a 5 ms
device see a 30 ms round trip between them. Everything here is pure; `load_scenario` raises `ScenarioError`
naming the file and the offending field.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tilemesh.planning.planner import STRATEGIES

KINDS = ("phone", "laptop", "edge")
MODELS = ("mobilenet_v2",)
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "bench" / "scenarios"
DEVICE_KEYS = {"name", "kind", "cores", "mbps", "delay_ms"}
TOP_KEYS = {"name", "description", "source", "model", "frames", "repeats", "warmup", "strategies", "devices",
            "variant", "device_counts", "depth", "ort_threads", "streams"}
STREAM_KEYS = {"cameras", "sizes", "window_s", "warmup_s", "latency_factor"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    cores: float
    mbps: float
    delay_ms: float

    @property
    def is_browser(self) -> bool:
        return self.kind != "edge"


@dataclass(frozen=True)
class Streams:
    cameras: tuple[str, ...]
    sizes: tuple[int, ...]
    window_s: float = 20.0
    warmup_s: float = 15.0
    latency_factor: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    devices: tuple[Device, ...]
    model: str = "mobilenet_v2"
    frames: int = 8
    repeats: int = 2
    warmup: int = 2
    strategies: tuple[str, ...] = STRATEGIES
    description: str = ""
    variant: str | None = None
    device_counts: tuple[int, ...] = ()
    depth: int = 0
    ort_threads: int = 0
    path: str = field(default="", compare=False)
    streams: Streams | None = None

    @property
    def edge(self) -> Device | None:
        return next((d for d in self.devices if d.kind == "edge"), None)

    @property
    def browsers(self) -> list[Device]:
        return [d for d in self.devices if d.is_browser]

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def windows(self) -> list[tuple[str, str, tuple[str, ...] | None]]:
        """(window name, strategy, devices planned over or None for all) per measurement window of a repeat.
        With `device_counts`, "single" runs once and every other strategy once per count N, over the first N
        devices (the source first, then file order)."""
        if not self.device_counts:
            return [(s, s, None) for s in self.strategies]
        order = [self.source, *(d.name for d in self.devices if d.name != self.source)]
        out = []
        for s in self.strategies:
            if s == "single":
                out.append((s, s, (self.source,)))
            else:
                out += [(f"{s}@{n}", s, tuple(order[:n])) for n in self.device_counts]
        return out

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "source": self.source, "model": self.model,
             "frames": self.frames, "repeats": self.repeats, "warmup": self.warmup,
             "strategies": list(self.strategies), "devices": [d.__dict__ for d in self.devices],
             **({"variant": self.variant} if self.variant else {}),
             **({"device_counts": list(self.device_counts)} if self.device_counts else {}),
             **({"depth": self.depth} if self.depth else {}),
             **({"ort_threads": self.ort_threads} if self.ort_threads else {})}
        if self.streams is not None:
            d["streams"] = {"cameras": list(self.streams.cameras), "sizes": list(self.streams.sizes),
                            "window_s": self.streams.window_s, "warmup_s": self.streams.warmup_s}
            if self.streams.latency_factor is not None:
                d["streams"]["latency_factor"] = self.streams.latency_factor
        return d

    def with_overrides(self, frames: int | None = None, repeats: int | None = None,
                       strategies: list[str] | None = None) -> Scenario:
        d = self.to_dict()
        if frames is not None:
            d["frames"] = frames
        if repeats is not None:
            d["repeats"] = repeats
        if strategies is not None:
            d["strategies"] = strategies
        return parse_scenario(d, self.path or "<overrides>")


def _number(where: str, key: str, value, *, minimum: float, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{where}: {key} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ScenarioError(f"{where}: {key} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _integer(where: str, key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScenarioError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _device(where: str, raw) -> Device:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: a device must be a table, got {raw!r}")
    unknown = set(raw) - DEVICE_KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(unknown)}; a device has {sorted(DEVICE_KEYS)}")
    missing = DEVICE_KEYS - set(raw)
    if missing:
        raise ScenarioError(f"{where}: missing key(s) {sorted(missing)}")
    name = raw["name"]
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ScenarioError(f"{where}: name must be letters, digits, '-' or '_', got {name!r}")
    if raw["kind"] not in KINDS:
        raise ScenarioError(f"{where} ({name}): kind must be one of {KINDS}, got {raw['kind']!r}")
    return Device(name, raw["kind"], _number(where, "cores", raw["cores"], minimum=0.01, strict=False),
                  _number(where, "mbps", raw["mbps"], minimum=0), _number(where, "delay_ms", raw["delay_ms"],
                                                                           minimum=0, strict=False))


def parse_scenario(raw, path: str = "<scenario>") -> Scenario:
    """Validate a scenario's parsed content (a dict from TOML or JSON)."""
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario must be a table/object, got {type(raw).__name__}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ScenarioError(f"{path}: unknown key(s) {sorted(unknown)}; a scenario has {sorted(TOP_KEYS)}")
    for key in ("name", "source", "devices"):
        if key not in raw:
            raise ScenarioError(f"{path}: missing {key!r}")
    if not isinstance(raw["devices"], list) or not raw["devices"]:
        raise ScenarioError(f"{path}: devices must be a non-empty list of [[devices]] tables")
    devices = tuple(_device(f"{path}: devices[{i}]", d) for i, d in enumerate(raw["devices"]))
    names = [d.name for d in devices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"{path}: device names must be unique, repeated: {dupes}")
    if sum(d.kind == "edge" for d in devices) > 1:
        raise ScenarioError(f"{path}: at most one edge device (the server is the only aiortc peer)")
    source = raw["source"]
    if source not in names:
        raise ScenarioError(f"{path}: source {source!r} is not a device; devices are {names}")
    if next(d for d in devices if d.name == source).kind == "edge":
        raise ScenarioError(f"{path}: the source must be a browser (phone or laptop): the edge has no camera")
    model = raw.get("model", "mobilenet_v2")
    if model not in MODELS:
        raise ScenarioError(f"{path}: model must be one of {MODELS}, got {model!r}")
    strategies = raw.get("strategies", list(STRATEGIES))
    if not isinstance(strategies, list) or not strategies:
        raise ScenarioError(f"{path}: strategies must be a non-empty list")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ScenarioError(f"{path}: unknown strategies {bad}; known: {list(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise ScenarioError(f"{path}: strategies listed twice: {strategies}")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{path}: name must be a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(f"{path}: description must be a string")
    variant = raw.get("variant")
    if variant is not None and not (isinstance(variant, str) and variant.replace("_", "").replace("-", "").isalnum()):
        raise ScenarioError(f"{path}: variant must be the name of one of the model card's variants, got {variant!r}")
    counts = raw.get("device_counts", [])
    if not isinstance(counts, list) or len(set(counts)) != len(counts) or any(
            isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(devices) for n in counts):
        raise ScenarioError(f"{path}: device_counts must be distinct integers in 2..{len(devices)} (the devices)")
    return Scenario(
        name=name, source=source, devices=devices, model=model, variant=variant, device_counts=tuple(counts),
        depth=_integer(path, "depth", raw.get("depth", 0), 0),
        ort_threads=_integer(path, "ort_threads", raw.get("ort_threads", 0), 0),
        streams=_streams(path, raw.get("streams"), devices, source),
        frames=_integer(path, "frames", raw.get("frames", 8), 1),
        repeats=_integer(path, "repeats", raw.get("repeats", 2), 1),
        warmup=_integer(path, "warmup", raw.get("warmup", 2), 0),
        strategies=tuple(strategies), description=description, path=path,
    )


def _streams(path: str, raw, devices: tuple[Device, ...], source: str) -> Streams | None:
    if raw is None:
        return None
    where = f"{path}: streams"
    if not isinstance(raw, dict) or set(raw) - STREAM_KEYS:
        raise ScenarioError(f"{where} must be a table with keys among {sorted(STREAM_KEYS)}")
    browsers = [d.name for d in devices if d.is_browser]
    cameras = raw.get("cameras", [source])
    if not isinstance(cameras, list) or not cameras or any(c not in browsers for c in cameras) \
            or len(set(cameras)) != len(cameras):
        raise ScenarioError(f"{where}: cameras must be distinct browsers of the scenario, got {cameras!r}")
    sizes = raw.get("sizes", [len(browsers)])
    if not isinstance(sizes, list) or not sizes:
        raise ScenarioError(f"{where}: sizes must be a non-empty list of room sizes")
    sizes = [_integer(where, "sizes", k, 1) for k in sizes]
    need = max(browsers.index(c) for c in cameras) + 1
    if any(k > len(browsers) or k < need for k in sizes):
        raise ScenarioError(f"{where}: each size must be between {need} (every camera in) and {len(browsers)}")
    factor = raw.get("latency_factor")
    if factor is not None:
        factor = _number(where, "latency_factor", factor, minimum=1.0, strict=False)
    return Streams(tuple(cameras), tuple(sizes), _number(where, "window_s", raw.get("window_s", 20.0), minimum=0),
                   _number(where, "warmup_s", raw.get("warmup_s", 15.0), minimum=0, strict=False), factor)


def load_scenario(path_or_name: str | Path) -> Scenario:
    """A scenario from a .toml or .json file, or by bare name from bench/scenarios/."""
    path = Path(path_or_name)
    if not path.exists() and path.suffix == "" and path.parent == Path("."):
        for ext in (".toml", ".json"):
            if (SCENARIO_DIR / f"{path}{ext}").exists():
                path = SCENARIO_DIR / f"{path}{ext}"
                break
    if not path.exists():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.*")) if SCENARIO_DIR.exists() else []
        raise ScenarioError(f"{path_or_name}: no such scenario file (bench/scenarios has {known})")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ScenarioError(f"{path}: a scenario file ends in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    return parse_scenario(raw, str(path))
