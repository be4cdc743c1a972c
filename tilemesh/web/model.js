// The served model as the server describes it in every page (tilemesh.server.model: name, node count, MACs per
// profile op class, input size, classes, the card's preprocessing), so no script names or sizes a model itself.
export function pageModel(doc = globalThis.document) {
  const el = doc?.getElementById("tilemesh-model");
  if (!el) return null;
  try {
    return JSON.parse(el.textContent);
  } catch {
    return null;
  }
}
