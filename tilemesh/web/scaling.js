// Context-aware scaling on the AR page: the user sets a target (at least N frames/s, or at most T per frame);
// the server's planner then picks the most accurate variant of the model (the card's variants with a measured
// agreement, e.g. 192 and 160 px, or the model as served) whose predicted figures in this room meet it
// (tilemesh.planning.variants). The device session keeps the target, so every background replan it asks for
// chooses again: a device leaving or a device's speed drifting drops the variant before the frame rate drops; a
// device becoming ready (the session's newcomer rule) lets it rise again.
import { pageModel } from "/web/model.js";

// "fps:5" -> {kind: "fps", value: 5}; "" -> null.
export function parseTarget(text) {
  if (!text) return null;
  const [kind, value] = String(text).split(":");
  const v = Number(value);
  return (kind === "fps" || kind === "latency") && v > 0 ? { kind, value: v } : null;
}

// The variant's name as people read it ("Fast (160 px)"; the model as served: "Normal (224 px)").
export function variantName(key, model = pageModel()) {
  if (!key) return `Normal (${model?.preprocess?.crop ?? "?"} px)`;
  return model?.variants?.[key]?.name ?? key;
}

// The target picker (#ar-target), bound to a RoomArEngine; ?target=fps:5 presets it.
export function bindTarget(select, engine) {
  const preset = parseTarget(new URLSearchParams(location.search).get("target"));
  if (preset) engine.setTarget(preset);
  if (select) {
    if (preset && ![...select.options].some((o) => o.value === `${preset.kind}:${preset.value}`)) {
      select.append(new Option(`${preset.value} ${preset.kind === "fps" ? "frames/s" : "s"}`, `${preset.kind}:${preset.value}`));
    }
    select.value = preset ? `${preset.kind}:${preset.value}` : "";
    select.onchange = () => engine.setTarget(parseTarget(select.value));
  }
}
