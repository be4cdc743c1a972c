// The phone's camera: the rear camera when there is one, and frames cut to what the model wants.
//
import { pageModel } from "/web/model.js";

// A frame is the centre square of the video scaled to the model card's `resize_shorter_side` (the demo: 256x256
// RGBA, torchvision's "shorter side to 256"); the peer runtime then crops the card's centre `crop` and
// normalises with its mean and std, exactly as on the server side.
export const FRAME_SIZE = pageModel()?.preprocess?.resize_shorter_side ?? 256;

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

export function grabFrame(video, canvas) {
  canvas.width = FRAME_SIZE;
  canvas.height = FRAME_SIZE;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  const { x, y, side } = cropRect(video);
  ctx.drawImage(video, x, y, side, side, 0, 0, FRAME_SIZE, FRAME_SIZE);
  return new Uint8Array(ctx.getImageData(0, 0, FRAME_SIZE, FRAME_SIZE).data.buffer);
}
