// facestream browser page: webcam -> JPEG frames over /ws -> class-id masks drawn over the video.
//
// Protocol (README, "WebSocket protocol"): the server says hello; each frame goes as one binary
// message; every frame gets exactly one answer (result, dropped or error) naming its frame_id,
// the count of binary messages sent before it. A result in png/raw format is followed by one
// binary message, its mask; an rle result carries the runs in its JSON.
//
// Flow control: at most MAX_IN_FLIGHT frames are unanswered at a time, and a camera frame is
// sent at most once, so the page never sends faster than the server answers or the camera films.
//
// For tests: document.body.dataset.results counts results; window.facestream holds the state.
"use strict";

(() => {
  // RGBA per class id (background, skin, eyes, lips, inner mouth); alpha 128 = 0.5 over the video.
  // Keep in step with the .swatch colours in style.css.
  const PALETTE = [
    [0, 0, 0, 0],
    [45, 125, 255, 128],
    [255, 214, 10, 128],
    [255, 45, 120, 128],
    [20, 220, 120, 128],
  ];
  const CLASS_NAMES = ["background", "skin", "eyes", "lips", "inner_mouth"];
  const MAX_IN_FLIGHT = 2;
  const FRAME_TIMEOUT_MS = 5000; // an answer this late is taken as lost, so sending goes on
  const STATS_WINDOW_MS = 2000; // frame rate over this window
  const RECENT = 30; // round trip and server time: means over this many results
  const CAPTURE_WIDTH = 640;
  const JPEG_QUALITY = 0.8;
  const FORWARDED_PARAMS = ["token", "scheduler", "knob", "format", "max_fps", "name"];
  const CLOSE_REASONS = {
    1000: "closed",
    1001: "the server is going away",
    1006: "connection lost",
    1011: "server error",
    1013: "try again later (the server is not ready or has too many streams)",
    4400: "bad query parameter",
    4401: "missing or wrong token (add ?token=... to the page address)",
    4409: "stream name in use",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $("start"),
    scheduler: $("scheduler"),
    knobForm: $("knob-form"),
    knobLabel: $("knob-label"),
    knob: $("knob"),
    knobApply: $("knob-apply"),
    showMask: $("show-mask"),
    status: $("status"),
    stage: $("stage"),
    video: $("video"),
    overlay: $("overlay"),
    fps: $("fps"),
    keyRatio: $("key-ratio"),
    rtt: $("rtt"),
    serverMs: $("server-ms"),
    results: $("results"),
    dropped: $("dropped"),
    frameKind: $("frame-kind"),
    backend: $("backend"),
  };
  const overlayCtx = ui.overlay.getContext("2d");
  const capture = document.createElement("canvas");
  const captureCtx = capture.getContext("2d");
  const scratch = document.createElement("canvas"); // PNG masks are decoded here
  const scratchCtx = scratch.getContext("2d", { willReadFrequently: true });
  const packedPalette = new Uint32Array(PALETTE.map(([r, g, b, a]) => ((a << 24) | (b << 16) | (g << 8) | r) >>> 0));

  /** What the page has seen; read by tests (window.facestream). */
  const state = {
    running: false,
    sent: 0,
    results: 0,
    dropped: 0,
    errors: 0,
    lost: 0,
    facesSeen: 0,
    configs: 0,
    hello: null,
    config: null,
    lastResult: null,
    log: [], // the last 200 answers: {frame_id, type, key, face, format, configs}
    overlayDrawn: false,
    maskPixels: null, // pixels per class in the last mask drawn
    fps: 0,
    rttMs: null,
    error: null,
  };
  window.facestream = state;

  let session = null; // the running stream: its socket, camera and counters

  // ---------------------------------------------------------------- status and statistics

  function setStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
    if (isError) state.error = text;
  }

  function logAnswer(message) {
    const { frame_id, type, key, face, format } = message;
    state.log.push({ frame_id, type, key, face, format, configs: state.configs });
    if (state.log.length > 200) state.log.shift();
  }

  function recordResult(s, result, rtt) {
    const now = performance.now();
    s.resultTimes.push(now);
    if (rtt !== null) pushRecent(s.rtts, rtt);
    if (result.timings_ms) pushRecent(s.serverMs, result.timings_ms.total);
    state.results += 1;
    state.facesSeen += result.face ? 1 : 0;
    const { rle, ...summary } = result; // the runs can be long: keep lastResult small
    state.lastResult = summary;
    document.body.dataset.results = String(state.results);
    updateRates(s, now);
    ui.results.textContent = String(state.results);
    ui.keyRatio.textContent = Number(result.key_ratio).toFixed(2);
    ui.frameKind.textContent = (result.key ? "key" : "warped") + (result.face ? "" : " (no face)");
  }

  function pushRecent(values, value) {
    values.push(value);
    if (values.length > RECENT) values.shift();
  }

  const mean = (values) => (values.length ? values.reduce((a, b) => a + b, 0) / values.length : null);

  /** Results per second over the last STATS_WINDOW_MS; mean round trip and server time. */
  function updateRates(s, now) {
    while (s.resultTimes.length && now - s.resultTimes[0] > STATS_WINDOW_MS) s.resultTimes.shift();
    const times = s.resultTimes;
    const span = times.length >= 2 ? times[times.length - 1] - times[0] : 0;
    state.fps = span > 0 ? ((times.length - 1) * 1000) / span : 0;
    state.rttMs = mean(s.rtts);
    const serverMs = mean(s.serverMs);
    ui.fps.textContent = state.fps.toFixed(1);
    ui.rtt.textContent = state.rttMs === null ? "–" : String(Math.round(state.rttMs));
    ui.serverMs.textContent = serverMs === null ? "–" : String(Math.round(serverMs));
  }

  // ---------------------------------------------------------------- masks

  /** Colour class ids (ids[i * step], i over width*height pixels) into the overlay canvas. */
  function paintMask(ids, step, width, height) {
    if (ui.overlay.width !== width || ui.overlay.height !== height) {
      ui.overlay.width = width;
      ui.overlay.height = height;
    }
    const image = overlayCtx.createImageData(width, height);
    const pixels = new Uint32Array(image.data.buffer); // RGBA bytes as little-endian words
    const counts = new Array(PALETTE.length).fill(0);
    for (let i = 0, n = width * height; i < n; i++) {
      const id = ids[i * step];
      if (id > 0 && id < PALETTE.length) {
        pixels[i] = packedPalette[id];
        counts[id] += 1;
      }
    }
    overlayCtx.putImageData(image, 0, 0);
    state.maskPixels = Object.fromEntries(CLASS_NAMES.map((name, id) => [name, counts[id]]));
    if (counts.some((count, id) => id > 0 && count > 0)) state.overlayDrawn = true;
  }

  function decodeRle(rle, width, height) {
    const ids = new Uint8Array(width * height);
    let at = 0;
    rle.values.forEach((value, i) => {
      ids.fill(value, at, at + rle.counts[i]);
      at += rle.counts[i];
    });
    if (at !== ids.length) throw new Error(`run-length mask covers ${at} pixels, not ${width}x${height}`);
    return ids;
  }

  async function pngClassIds(bytes, width, height) {
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
      premultiplyAlpha: "none",
      colorSpaceConversion: "none",
    });
    scratch.width = width;
    scratch.height = height;
    scratchCtx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return scratchCtx.getImageData(0, 0, width, height).data; // grey: R = class id
  }

  /** Draw the mask of ``result``; masks of older frames than the one drawn are skipped. */
  async function drawMask(s, result, bytes) {
    const { frame_id: frameId, width, height, format } = result;
    try {
      if (format === "png") {
        const rgba = await pngClassIds(bytes, width, height);
        if (s !== session || frameId < s.drawnFrameId) return;
        s.drawnFrameId = frameId;
        paintMask(rgba, 4, width, height);
      } else {
        const ids = format === "rle" ? decodeRle(result.rle, width, height) : new Uint8Array(bytes);
        s.drawnFrameId = frameId;
        paintMask(ids, 1, width, height);
      }
    } catch (err) {
      setStatus(`Could not draw the mask of frame ${frameId}: ${err.message}`, true);
    }
  }

  function clearOverlay() {
    overlayCtx.clearRect(0, 0, ui.overlay.width, ui.overlay.height);
  }

  // ---------------------------------------------------------------- scheduler controls

  function showScheduler(name, knob) {
    if (name && [...ui.scheduler.options].some((option) => option.value === name)) ui.scheduler.value = name;
    const entry = knob ? Object.entries(knob)[0] : null;
    ui.knobLabel.textContent = entry ? `Knob (${entry[0]})` : "Knob (none)";
    ui.knob.value = entry ? String(entry[1]) : "";
    ui.knob.disabled = ui.knobApply.disabled = !entry;
  }

  function fillSchedulers(names, current) {
    ui.scheduler.replaceChildren(
      ...names.map((name) => {
        const option = document.createElement("option");
        option.value = option.textContent = name;
        return option;
      }),
    );
    ui.scheduler.disabled = false;
    ui.scheduler.value = current;
  }

  function sendConfig(change) {
    if (!session || session.ws.readyState !== WebSocket.OPEN) return;
    session.ws.send(JSON.stringify({ type: "config", ...change }));
  }

  // ---------------------------------------------------------------- frames out

  /** Send the camera's current frame when a slot is free and the frame is new. */
  function pump(s) {
    if (s !== session || !s.hello || s.capturing || s.ws.readyState !== WebSocket.OPEN) return;
    if (s.inFlight.size >= MAX_IN_FLIGHT || ui.video.readyState < HTMLMediaElement.HAVE_CURRENT_DATA) return;
    if (s.presented !== null && s.presented === s.sentPresented) return; // no new camera frame yet
    s.capturing = true;
    s.sentPresented = s.presented;
    captureCtx.drawImage(ui.video, 0, 0, capture.width, capture.height);
    capture.toBlob(
      (blob) => {
        s.capturing = false;
        if (!blob || s !== session || s.ws.readyState !== WebSocket.OPEN) return;
        s.inFlight.set(s.nextFrameId, performance.now());
        s.nextFrameId += 1;
        s.ws.send(blob);
        state.sent += 1;
        pump(s);
      },
      "image/jpeg",
      JPEG_QUALITY,
    );
  }

  /** The frame is answered: free its slot; its round trip in ms (null when unknown). */
  function settle(s, frameId) {
    const sentAt = s.inFlight.get(frameId);
    s.inFlight.delete(frameId);
    return sentAt === undefined ? null : performance.now() - sentAt;
  }

  /** Every 250 ms: forget frames whose answer is overdue, let the rates decay, and send. */
  function housekeep(s) {
    const now = performance.now();
    for (const [frameId, sentAt] of s.inFlight) {
      if (now - sentAt > FRAME_TIMEOUT_MS) {
        s.inFlight.delete(frameId);
        state.lost += 1;
      }
    }
    updateRates(s, now);
    pump(s);
  }

  function watchCameraFrames(s) {
    if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return; // housekeep sends
    const onFrame = (_now, metadata) => {
      if (s !== session) return;
      s.presented = metadata.presentedFrames;
      pump(s);
      ui.video.requestVideoFrameCallback(onFrame);
    };
    ui.video.requestVideoFrameCallback(onFrame);
  }

  // ---------------------------------------------------------------- messages in

  function onText(s, message) {
    switch (message.type) {
      case "hello":
        s.hello = s.described = state.hello = message;
        ui.backend.textContent = message.backend;
        fillSchedulers(message.schedulers, message.scheduler);
        showScheduler(message.scheduler, message.knob);
        setStatus(`Streaming to ${message.backend} as ${message.name}.`);
        pump(s);
        break;
      case "config":
        s.described = state.config = message;
        state.configs += 1;
        showScheduler(message.scheduler, message.knob);
        setStatus(`Scheduler ${message.scheduler}${knobText(message.knob)}: the key cache starts afresh.`);
        break;
      case "result": {
        const rtt = settle(s, message.frame_id);
        logAnswer(message);
        recordResult(s, message, rtt);
        if (message.format === "png" || message.format === "raw") s.maskHeader = message;
        else if (message.format === "rle") drawMask(s, message, null);
        else {
          s.drawnFrameId = message.frame_id; // no face: nothing to draw, and no older mask either
          clearOverlay();
        }
        pump(s);
        break;
      }
      case "dropped":
        settle(s, message.frame_id);
        logAnswer(message);
        state.dropped += 1;
        ui.dropped.textContent = String(state.dropped);
        pump(s);
        break;
      case "error":
        if (message.frame_id !== undefined) {
          settle(s, message.frame_id);
          logAnswer(message);
          state.errors += 1;
          pump(s);
        } else if (s.described) {
          showScheduler(s.described.scheduler, s.described.knob); // a refused change: show what holds
        }
        setStatus(`Server: ${message.reason}: ${message.message}`, true);
        break;
      default:
        break; // newer servers may say more; ignore what this page does not know
    }
  }

  function knobText(knob) {
    const entry = knob ? Object.entries(knob)[0] : null;
    return entry ? ` (${entry[0]} = ${entry[1]})` : "";
  }

  function onMessage(s, data) {
    if (s !== session) return;
    if (typeof data === "string") {
      onText(s, JSON.parse(data));
      return;
    }
    const header = s.maskHeader; // a binary message is the mask of the result just before it
    s.maskHeader = null;
    if (header) drawMask(s, header, data);
  }

  function onClose(s, event) {
    if (s !== session) return; // closed by Stop
    const reason = event.reason || CLOSE_REASONS[event.code] || "";
    stop();
    setStatus(`Socket closed: code ${event.code}${reason ? ` (${reason})` : ""}.`, true);
  }

  // ---------------------------------------------------------------- start and stop

  function socketUrl() {
    const page = new URL(window.location.href);
    const url = new URL("ws", page); // relative: works behind a path prefix too
    url.protocol = page.protocol === "https:" ? "wss:" : "ws:";
    for (const key of FORWARDED_PARAMS) {
      const value = page.searchParams.get(key);
      if (value) url.searchParams.set(key, value);
    }
    return url.href;
  }

  function cameraError(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Camera permission denied: allow the camera for this page and press Start again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No camera found.";
      case "NotReadableError":
        return "The camera is busy (another program is using it).";
      default:
        return `The camera could not start: ${err && err.name}: ${err && err.message}`;
    }
  }

  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This browser cannot share a camera here (the page needs https or localhost).");
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 } },
        audio: false,
      });
    } catch (err) {
      throw new Error(cameraError(err));
    }
    ui.video.srcObject = stream;
    if (ui.video.readyState < HTMLMediaElement.HAVE_METADATA) {
      await new Promise((resolve) => ui.video.addEventListener("loadedmetadata", resolve, { once: true }));
    }
    await ui.video.play().catch(() => {}); // autoplay + muted: play() only fails where it is not needed
    const width = ui.video.videoWidth || 640;
    const height = ui.video.videoHeight || 480;
    const scale = Math.min(1, CAPTURE_WIDTH / width);
    capture.width = Math.round(width * scale);
    capture.height = Math.round(height * scale);
    ui.stage.style.aspectRatio = `${width} / ${height}`;
    return stream;
  }

  async function start() {
    ui.start.disabled = true;
    setStatus("Asking for the camera…");
    let camera;
    try {
      camera = await openCamera();
    } catch (err) {
      ui.start.disabled = false;
      setStatus(err.message, true);
      return;
    }
    const ws = new WebSocket(socketUrl());
    ws.binaryType = "arraybuffer";
    const s = {
      ws,
      camera,
      hello: null,
      described: null, // the stream as the server last described it (hello or config)
      inFlight: new Map(), // frame_id -> performance.now() when sent
      nextFrameId: 0,
      capturing: false,
      presented: null, // the camera frame shown now (requestVideoFrameCallback), and the last sent
      sentPresented: null,
      maskHeader: null,
      drawnFrameId: -1,
      resultTimes: [],
      rtts: [],
      serverMs: [],
      timer: null,
    };
    session = s;
    state.running = true;
    s.timer = setInterval(() => housekeep(s), 250);
    ws.addEventListener("open", () => setStatus("Connected; waiting for the server…"));
    ws.addEventListener("message", (event) => onMessage(s, event.data));
    ws.addEventListener("close", (event) => onClose(s, event));
    watchCameraFrames(s);
    ui.start.textContent = "Stop";
    ui.start.disabled = false;
  }

  function stop() {
    const s = session;
    session = null;
    state.running = false;
    if (s) {
      clearInterval(s.timer);
      if (s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000, "stopped");
      s.camera.getTracks().forEach((track) => track.stop());
    }
    ui.video.srcObject = null;
    clearOverlay();
    ui.scheduler.disabled = ui.knob.disabled = ui.knobApply.disabled = true;
    ui.start.textContent = "Start";
    ui.start.disabled = false;
    setStatus("Stopped.");
  }

  // ---------------------------------------------------------------- wiring

  ui.start.addEventListener("click", () => (session ? stop() : start()));
  ui.scheduler.addEventListener("change", () => sendConfig({ scheduler: ui.scheduler.value }));
  ui.knobForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = Number.parseFloat(ui.knob.value);
    if (!Number.isFinite(value)) {
      setStatus(`The knob must be a number, got "${ui.knob.value}".`, true);
      return;
    }
    sendConfig({ knob: value });
  });
  ui.showMask.addEventListener("change", () => ui.overlay.classList.toggle("hidden", !ui.showMask.checked));
})();
