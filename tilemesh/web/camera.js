// The phone's camera: the rear camera when there is one, and frames cut to what the model wants.
//
import { pageModel } from "/web/model.js";

// The model card's preprocessing: the centre square of the video scaled so its side is `resize_shorter_side`
// (FRAME_SIZE; the demo: 256, torchvision's "shorter side to 256"), then the centre `crop` x `crop` (INPUT_SIZE)
// normalised as (pixel / 255 - mean) / std. The browser does the scaling and the crop in one canvas draw (the
// crop's own part of the video, drawn at the model's input size), so Python never resamples a frame; the peer
// runtime accepts frames of either size (tilemesh.runtime.preprocess.centre_crop_u8).
const PRE = pageModel()?.preprocess ?? {};
export const FRAME_SIZE = PRE.resize_shorter_side ?? 256;
export const INPUT_SIZE = PRE.crop ?? 224;
// `?preprocess=python` keeps the reference path for comparison (bench/camera_cpu.py): the page hands over the
// centre square at FRAME_SIZE and Python crops (and, on a lone device, resamples and normalises) it.
const PYTHON_PRE = typeof location !== "undefined" && new URLSearchParams(location.search).get("preprocess") === "python";
export const GRAB_SIZE = PYTHON_PRE ? FRAME_SIZE : INPUT_SIZE;

// The sizes of the model as served (`variant` null) or of one of its variants (heavy mode: frames scaled to
// 512, input 448): {frame, input, grab}, grab being the side of the frames grabFrame hands over.
export function sizesOf(variant, model = pageModel()) {
  const pre = (variant ? model?.variants?.[variant]?.preprocess : model?.preprocess) ?? {};
  const frame = pre.resize_shorter_side ?? 256;
  const input = pre.crop ?? 224;
  return { frame, input, grab: PYTHON_PRE ? frame : input };
}

export async function openCamera(video) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this page has no camera access: open it over https (or on localhost)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: false,
    video: { facingMode: { ideal: "environment" }, width: { ideal: 640 }, height: { ideal: 480 } },
  });
  video.srcObject = stream;
  video.muted = true;
  video.playsInline = true;
  await video.play();
  if (!video.videoWidth) await new Promise((resolve) => video.addEventListener("loadedmetadata", resolve, { once: true }));
  return stream;
}

// The square of the video the model sees, in video pixels (also used to place the device map on screen).
export function cropRect(video) {
  const side = Math.min(video.videoWidth, video.videoHeight);
  return { x: (video.videoWidth - side) / 2, y: (video.videoHeight - side) / 2, side };
}

// The part of the video that becomes the model's input: the centre `crop` of the square scaled to FRAME_SIZE,
// in video pixels (torchvision's CenterCrop offset: round((FRAME_SIZE - crop) / 2) scaled pixels).
export function inputRect(video, frameSize = FRAME_SIZE, inputSize = INPUT_SIZE) {
  const { x, y, side } = cropRect(video);
  const scale = side / frameSize;
  const off = Math.round((frameSize - inputSize) / 2) * scale;
  return { x: x + off, y: y + off, side: inputSize * scale };
}

// One camera frame as the model's input pixels: INPUT_SIZE x INPUT_SIZE RGBA, scaled and cropped by the canvas
// (GRAB_SIZE: FRAME_SIZE under ?preprocess=python); `sizes` (sizesOf) for a variant of the model.
export function grabFrame(video, canvas, sizes = null) {
  const { frame, input, grab } = sizes ?? { frame: FRAME_SIZE, input: INPUT_SIZE, grab: GRAB_SIZE };
  canvas.width = grab;
  canvas.height = grab;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  const { x, y, side } = PYTHON_PRE ? cropRect(video) : inputRect(video, frame, input);
  ctx.drawImage(video, x, y, side, side, 0, 0, grab, grab);
  return new Uint8Array(ctx.getImageData(0, 0, grab, grab).data.buffer);
}

// RGBA pixels (size x size) -> the model's (1, 3, size, size) float32 input, (pixel / 255 - mean) / std per
// channel, as tilemesh.runtime.preprocess.normalize_u8 computes it (one multiply-add in float32 per value).
export function normalizeFrame(rgba, size, mean = [0, 0, 0], std = [1, 1, 1]) {
  const plane = size * size;
  if (rgba.length !== plane * 4) throw new Error(`frame of ${rgba.length} bytes is not ${size}x${size} RGBA`);
  const out = new Float32Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    const scale = Math.fround(1 / (255 * std[c]));
    const offset = Math.fround(-mean[c] / std[c]);
    const base = c * plane;
    for (let i = 0; i < plane; i++) out[base + i] = Math.fround(Math.fround(rgba[4 * i + c] * scale) + offset);
  }
  return out;
}

// A square RGBA frame (`from` x `from`) scaled to `to` x `to`: a frame grabbed for one size of the model (a
// variant) that reaches a plan for another, e.g. when scaling switched variants while it was in flight. The
// variants share the field of view, so only the resolution changes.
export function rescaleFrame(rgba, from, to) {
  if (from === to) return rgba;
  const src = new OffscreenCanvas(from, from);
  src.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rgba.buffer, rgba.byteOffset, rgba.length),
    from, from), 0, 0);
  const dst = new OffscreenCanvas(to, to);
  const ctx = dst.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(src, 0, 0, to, to);
  return new Uint8Array(ctx.getImageData(0, 0, to, to).data.buffer);
}
