"""Learned allocation: the room's picture of itself, corrected by what its frames measure (pure).

A device's profile and its link probes are measured once, at join (and again once the room settles); frames
then measure the truth all the time: each device's compute per frame against the plan's prediction for it, and
the bytes that crossed each link in how long. Every `REPORT_EVERY`-th frame each device of a plan broadcasts a
`frame_report` (`tilemesh.runtime.session`), which the server reads on its way through (`observe`):

* compute: a per-device correction `factor`, a robust running ratio measured / profile-predicted compute (the
  median of the last `WINDOW` ratios, each bounded to `BOUND`). A sample is the plan's own ratio times the
  factor the plan was made with (plans are made with corrected profiles). A new profile from the device (it
  re-measured itself: drift, the room settling) keeps what was learned of its true speed: the factors are
  rescaled by the two profiles' whole-model predictions (a profile measured alone on a shared machine reads fast
  again and again; frames know better);
* links: per directed link, the median of the last `WINDOW` throughputs the receiver measured on multi-chunk
  messages (the time from a message's first chunk to its last), which replaces the probe's figure once
  `MIN_SAMPLES` have come.

`corrected(profiles, links, picture)` is what the planner gets. `replan_due(picture, plan, now)` says when the
picture moved far enough from the one the running plan was made with: a device's factor by more than
`MARGIN` (25%) or a link's throughput by more than `LINK_MARGIN` (50%), or by `NOISE_SIGMAS` standard errors
where the samples are noisier than the margin allows for, with all but one of the samples since that plan
beyond half the margin on the same side (a sign test), judged on a whole window of samples
taken since that plan was made (a change half-way through the window never replans twice), and not within
`COOLDOWN_S` of the last replan (hysteresis: noise within the margins never replans, and the server sends the
new plan only when it differs from the running one).

Stragglers and devices that stall are `tilemesh.runtime.recovery`'s: it excludes them from plans for a while.
This module only corrects speeds; a device 10x slower than profiled is corrected to `BOUND` and recovery does
the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tilemesh.runtime.profile import scaled_profile

WINDOW = 9  # an estimate is the median of this many latest samples
BOUND = (0.2, 5.0)  # a device's correction factor stays within these
MIN_SAMPLES = 3  # a device's or link's figures count (and can trigger a replan) from this many samples on
MARGIN = 0.25  # a factor this far (relative) from the running plan's makes a replan due
LINK_MARGIN = 0.5  # a link's throughput this far from the running plan's makes a replan due
COOLDOWN_S = 10.0  # at most one replan for the picture in this long
NOISE_SIGMAS = 4.0  # and a move must stand out of the samples' own noise by this many standard errors


@dataclass(frozen=True)
class Estimate:
    """A running estimate: the median of the last `WINDOW` samples (kept as logs), `n` samples in all, `base`
    the profile it corrects. The median ignores a hiccup or two, and follows a real change within
    `WINDOW // 2 + 1` samples in one step (so the change replans once, not once per step of a slow average)."""

    recent: tuple = ()
    n: int = 0
    base: str = ""
    model_s: float = 0.0  # the whole model's time its base profile predicts (0: not known)

    @property
    def log(self) -> float:
        xs = sorted(self.recent)
        k = len(xs)
        return 0.0 if not k else xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])

    @property
    def value(self) -> float:
        return math.exp(self.log)


@dataclass(frozen=True)
class PlanPicture:
    """What a plan was made with: each device's factor and each link's throughput (Mbit/s) as corrected then."""

    plan_id: int
    source: str = ""
    factors: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    predicted_s: dict = field(default_factory=dict)  # device -> the plan's predicted compute seconds per frame
    bases: dict = field(default_factory=dict)  # device -> fingerprint of the profile the plan used
    seen: dict = field(default_factory=dict)  # device or link -> samples its estimate had then


@dataclass(frozen=True)
class Picture:
    compute: dict = field(default_factory=dict)  # device -> Estimate of the correction factor
    links: dict = field(default_factory=dict)  # (src, dst) -> Estimate of the throughput in Mbit/s
    plans: dict = field(default_factory=dict)  # plan id -> PlanPicture (the last few)
    replanned_at: float | None = None


def _bounded(x: float, bound: tuple[float, float] | None) -> float:
    return x if bound is None else min(max(x, math.log(bound[0])), math.log(bound[1]))


def rebased(est: Estimate, base: str, model_s: float = 0.0, bound: tuple[float, float] | None = BOUND) -> Estimate:
    """`est` carried over to a new profile of the same device (it measured itself again): what was learned is
    the device's true speed, so the factors are rescaled by the two profiles' whole-model predictions; without
    them the estimate starts again."""
    if est.base == base:
        return est
    if est.model_s > 0 and model_s > 0 and est.recent:
        shift = math.log(est.model_s / model_s)
        return Estimate(tuple(_bounded(x + shift, bound) for x in est.recent), est.n, base, model_s)
    return Estimate(base=base, model_s=model_s)


def _add(est: Estimate, sample: float, base: str, bound: tuple[float, float] | None = None,
         model_s: float = 0.0) -> Estimate:
    x = _bounded(math.log(max(sample, 1e-12)), bound)
    est = rebased(est, base, model_s, bound) if bound is not None else (
        est if est.base == base else Estimate(base=base))
    return Estimate((*est.recent, x)[-WINDOW:], est.n + 1, base, model_s or est.model_s)


def fingerprint(profile: dict | None) -> str:
    """What identifies a device's reported profile: a new one (the device re-measured) restarts its correction."""
    if not isinstance(profile, dict):
        return ""
    spm = profile.get("sec_per_mac") or {}
    keys = ("backend", "overhead_s", "chain_factor", "task_s", "model_ms", "threads")
    return repr((tuple(sorted((k, float(v)) for k, v in spm.items() if isinstance(v, int | float))),
                 tuple(profile.get(k) for k in keys)))


def factor(picture: Picture, device: str, base: str, model_s: float = 0.0) -> float:
    """The correction the planner applies to `device`'s profile `base` (whose whole-model prediction is `model_s`),
    1 until `MIN_SAMPLES` samples; learned on an older profile of the device, it is rescaled (`rebased`)."""
    est = picture.compute.get(device)
    if est is None or est.n < MIN_SAMPLES:
        return 1.0
    est = rebased(est, base, model_s)
    return est.value if est.recent else 1.0


def link_mbps(picture: Picture, src: str, dst: str) -> float | None:
    est = picture.links.get((src, dst))
    return est.value if est is not None and est.n >= MIN_SAMPLES else None


def corrected(profiles: dict[str, dict], links: dict, picture: Picture,
              model_s: dict[str, float] | None = None) -> tuple[dict[str, dict], dict]:
    """The planner's inputs with the learned corrections: each profile slowed or sped up by its factor, each
    link's throughput replaced by the measured one (its probe's round trip stays). `model_s`: each profile's
    whole-model prediction (carries corrections over a device's new profile)."""
    out_p = {}
    for d, prof in profiles.items():
        f = factor(picture, d, fingerprint(prof), (model_s or {}).get(d, 0.0))
        out_p[d] = prof if f == 1.0 else {**scaled_profile(prof, 1.0 / f), "samples": prof.get("samples", []),
                                           "learned_factor": round(f, 4)}
    out_l = dict(links)
    for a, b in picture.links:
        m = link_mbps(picture, a, b)
        if m is not None and (a, b) in out_l:
            out_l[(a, b)] = {**out_l[(a, b)], "mbps": m, "learned": True}
    return out_p, out_l


def planned(picture: Picture, plan_id: int, source: str, profiles: dict[str, dict], links: dict,
            predicted_s: dict, keep: int = 8, model_s: dict[str, float] | None = None) -> Picture:
    """Record what plan `plan_id` was made with: the devices' profiles (`profiles`, as reported) and factors then,
    the links as corrected then, and its per-device compute predictions."""
    bases = {d: fingerprint(p) for d, p in profiles.items()}
    factors = {d: factor(picture, d, bases[d], (model_s or {}).get(d, 0.0)) for d in profiles}
    mbps = {k: float(v["mbps"]) for k, v in links.items()}
    seen = {**{d: picture.compute[d].n for d in profiles if d in picture.compute},
            **{k: picture.links[k].n for k in links if k in picture.links}}
    plans = {**picture.plans, plan_id: PlanPicture(plan_id, source, factors, mbps, dict(predicted_s), bases, seen)}
    for old in sorted(plans)[:-keep]:
        del plans[old]
    return replace(picture, plans=plans)


def observe(picture: Picture, plan_id: int, device: str, compute_s: float, profile: dict | None,
            links: dict | None = None, model_s: float = 0.0) -> Picture:
    """One frame report: `device` computed for `compute_s` seconds under plan `plan_id`, and received
    `links` = {src: {"bytes", "seconds"}} (multi-chunk messages, first chunk to last)."""
    plan = picture.plans.get(plan_id)
    compute = dict(picture.compute)
    base = fingerprint(profile)
    # Only against the profile the plan was made with: a device that re-measured itself since says nothing yet.
    if (plan is not None and compute_s > 0 and plan.predicted_s.get(device, 0) > 0
            and plan.bases.get(device) == base):
        sample = plan.factors.get(device, 1.0) * compute_s / plan.predicted_s[device]
        compute[device] = _add(compute.get(device, Estimate()), sample, base, BOUND, model_s)
    out_links = dict(picture.links)
    for src, m in (links or {}).items():
        try:
            nbytes, seconds = float(m["bytes"]), float(m["seconds"])
        except (KeyError, TypeError, ValueError):
            continue
        if nbytes > 0 and seconds > 0 and math.isfinite(nbytes / seconds):
            key = (str(src), device)
            out_links[key] = _add(out_links.get(key, Estimate()), nbytes * 8 / 1e6 / seconds, "")
    return replace(picture, compute=compute, links=out_links)


def moved(est: Estimate, was: float, margin: float, fresh: int) -> bool:
    """Whether `est` has moved from a plan's value `was` (not a log) beyond the margin: its median by more than
    `threshold`, and all but one of its `fresh` samples (taken since the plan) beyond half the margin on the
    same side (a sign test: a plan made on a lucky or unlucky median is not replanned for noise)."""
    d = est.log - math.log(was)
    if abs(d) <= threshold(est, margin):
        return False
    half = 0.5 * math.log1p(margin)
    new = est.recent[-min(fresh, len(est.recent)):]
    beyond = sum(1 for x in new if (x - math.log(was)) * math.copysign(1.0, d) > half)
    return beyond >= len(new) - 1


def threshold(est: Estimate, margin: float) -> float:
    """How far (log) an estimate must move from a plan's to replan: the stated margin, or `NOISE_SIGMAS` standard
    errors of the difference of two window medians where the samples are noisier than that (robust spread: the
    median absolute deviation of the window)."""
    xs = sorted(est.recent)
    med = est.log
    mad = sorted(abs(x - med) for x in xs)[len(xs) // 2] if xs else 0.0
    se = 1.2533 * 1.4826 * mad / math.sqrt(max(len(xs), 1))  # standard error of a median
    return max(math.log1p(margin), NOISE_SIGMAS * math.sqrt(2.0) * se)


def replan_due(picture: Picture, plan_id: int, profiles: dict[str, dict], now: float,
               model_s: dict[str, float] | None = None) -> tuple[Picture, str | None]:
    """Whether the running plan `plan_id` was made with a picture that has since moved beyond the margins (the
    reason), or None; a replan due is recorded (`replanned_at`), so the cooldown holds off the next."""
    plan = picture.plans.get(plan_id)
    if plan is None or (picture.replanned_at is not None and now - picture.replanned_at < COOLDOWN_S):
        return picture, None
    reason = None
    def fresh(key, est) -> bool:  # a whole window of samples taken since the plan was made
        return est is not None and est.n >= MIN_SAMPLES and est.n - plan.seen.get(key, 0) >= WINDOW

    for d, was in sorted(plan.factors.items()):
        est = picture.compute.get(d)
        # a device that measured itself again since the plan tells the source so itself (`profile_changed`)
        if d not in profiles or not fresh(d, est) or fingerprint(profiles[d]) != plan.bases.get(d):
            continue
        now_f = factor(picture, d, fingerprint(profiles[d]), (model_s or {}).get(d, 0.0))
        if was > 0 and moved(est, was, MARGIN, est.n - plan.seen.get(d, 0)):
            reason = f"{d} computes at {now_f:.2f}x its profile (plan made with {was:.2f}x)"
            break
    if reason is None:
        for (a, b), was in sorted(plan.links.items()):
            m = link_mbps(picture, a, b)
            est = picture.links.get((a, b))
            if fresh((a, b), est) and was > 0 and moved(est, was, LINK_MARGIN, est.n - plan.seen.get((a, b), 0)):
                reason = f"link {a}->{b} carries {m:.1f} Mbit/s (plan made with {was:.1f})"
                break
    if reason is None:
        return picture, None
    return replace(picture, replanned_at=now), reason
