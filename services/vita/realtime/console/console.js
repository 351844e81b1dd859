// The VITA console: a Realtime API client in one file (docs/realtime.md, "Browser console").
//
// Microphone: getUserMedia -> AudioWorklet (mic-worklet.js) -> PCM16 at the AudioContext's rate (24 kHz asked for;
//   the rate is declared in session.update) -> input_audio_buffer.append every 100 ms. The server's VAD and the
//   model decide what is a question: the page never commits.
// Camera: a live preview; when speech starts (or a message is typed) the current frame goes out as an input_image
//   item, one at a time: it joins the next answered turn, so the answer sees what the camera showed.
// Playback: response.output_audio.delta (PCM16 24 kHz) is scheduled gaplessly; when a response ends cancelled
//   (a spoken barge-in or "Stop answer") the rest is dropped and conversation.item.truncate reports what was heard.
// Timeline: every server event (and the client events, appends counted) with its JSON, audio elided.
"use strict";

const $ = (id) => document.getElementById(id);
const OUTPUT_RATE = 24000;
const MAX_ROWS = 3000;

const state = {
  ws: null, ctx: null, inputRate: OUTPUT_RATE,
  mic: null, micNode: null, camera: null,
  imageWaiting: false,  // a frame was sent and no answer has taken it yet
  response: null,  // {id, itemId} of the response in progress
  play: null,  // {itemId, chunks: [{start, ms, offsetMs}], sources: [], next, cut}
  bubbles: new Map(),  // item id -> conversation <li>
  runs: new Map(),  // event type -> the timeline row counting its current run (audio appends and deltas)
};

// ---------------------------------------------------------------------------------------------------------------
// Connection

function setStatus(text, kind) {
  $("status").textContent = text;
  document.body.dataset.state = kind;
}

function enable(connected) {
  for (const id of ["mic", "camera", "text", "send", "disconnect"]) $(id).disabled = !connected;
  $("connect").disabled = connected;
  $("snap").disabled = !(connected && state.camera);
}

async function connect(event) {
  event.preventDefault();
  // Created on a click, so the browser lets it run (autoplay policy); 24 kHz asked, the actual rate is declared.
  state.ctx = state.ctx || new AudioContext({ sampleRate: OUTPUT_RATE });
  await state.ctx.resume();
  state.inputRate = state.ctx.sampleRate;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/v1/realtime?model=${encodeURIComponent($("model").value || "vita")}`;
  const key = $("api-key").value.trim();
  const protocols = ["realtime", ...(key ? [`openai-insecure-api-key.${key}`] : [])];
  setStatus("connecting", "connecting");
  const ws = new WebSocket(url, protocols);
  state.ws = ws;
  ws.onmessage = (message) => onServerEvent(JSON.parse(message.data));
  ws.onclose = (close) => {
    if (state.ws !== ws) return;
    state.ws = null;
    stopMic();
    stopCamera();
    stopPlayback();
    enable(false);
    const why = close.code === 1000 || close.code === 1005 ? "" : ` (${close.code}${close.reason ? ": " + close.reason : ""})`;
    setStatus(`disconnected${why}`, close.code === 1000 || close.code === 1005 ? "disconnected" : "error");
  };
  ws.onerror = () => setStatus("connection failed (wrong key? see the server log)", "error");
}

function disconnect() {
  if (state.ws) state.ws.close(1000);
}

function send(event) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  state.ws.send(JSON.stringify(event));
  record(event, "client");
}

function configure() {
  send({
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: [$("modality").value],
      audio: { input: { format: { type: "audio/pcm", rate: state.inputRate } } },
    },
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Server events

function onServerEvent(ev) {
  record(ev, "server");
  switch (ev.type) {
    case "session.created":
      setStatus(`connected: ${ev.session.id}`, "connected");
      enable(true);
      configure();
      break;
    case "input_audio_buffer.speech_started":
      $("speech").textContent = "speech";
      $("speech").classList.add("active");
      attachFrame();  // what the camera shows as the question starts
      break;
    case "input_audio_buffer.speech_stopped":
      $("speech").textContent = "judging";
      break;
    case "input_audio_buffer.committed":
      $("speech").textContent = "query";
      $("speech").classList.remove("active");
      break;
    case "vita.utterance.ignored":
      $("speech").textContent = "ignored";
      $("speech").classList.remove("active");
      bubble(ev.item_id, "ignored", `(speech ${ev.audio_start_ms}-${ev.audio_end_ms} ms judged not for the assistant)`);
      break;
    case "conversation.item.added":  // (conversation.item.done follows with the item complete: the answer's text
      // arrives by its deltas and response.done)
      if (ev.item.role === "user") userBubble(ev.item);
      else bubble(ev.item.id, "assistant", "");
      break;
    case "response.created":
      state.imageWaiting = false;  // the answer took the waiting frame
      state.response = { id: ev.response.id };
      $("stop").disabled = false;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      bubble(ev.item_id, "assistant").textContent += ev.delta;
      break;
    case "response.output_audio.delta":
      playChunk(ev.item_id, ev.delta);
      break;
    case "response.done":
      onResponseDone(ev.response);
      break;
    case "conversation.item.truncated": {
      const li = state.bubbles.get(ev.item_id);
      if (li) li.classList.add("cut");
      break;
    }
    case "error":
      console.warn("server error", ev.error);
      break;
  }
}

function onResponseDone(response) {
  state.response = null;
  $("stop").disabled = true;
  const item = response.output && response.output[0];
  if (!item) return;
  const part = item.content && item.content[0];
  const text = part ? (part.transcript ?? part.text ?? "") : "";
  bubble(item.id, "assistant").textContent = text;
  if (response.status === "cancelled") cutPlayback(item.id);
}

// ---------------------------------------------------------------------------------------------------------------
// Microphone

async function toggleMic() {
  if (state.mic) return stopMic();
  const processing = $("processing").checked;
  try {
    state.mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
    });
  } catch (e) {
    return setStatus(`microphone: ${e.message} (browsers allow it on localhost or HTTPS only)`, "error");
  }
  await state.ctx.audioWorklet.addModule("mic-worklet.js");
  const source = state.ctx.createMediaStreamSource(state.mic);
  const node = new AudioWorkletNode(state.ctx, "pcm16-capture",
    { processorOptions: { chunkSamples: Math.round(state.inputRate / 10) } });
  node.port.onmessage = ({ data }) => {
    $("level").value = Math.min(1, data.level * 4);
    send({ type: "input_audio_buffer.append", audio: base64(data.pcm) });
  };
  const mute = state.ctx.createGain();  // pulls the worklet without sending the microphone to the speakers
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(state.ctx.destination);
  state.micNode = { source, node, mute };
  $("mic").textContent = "Stop microphone";
  $("mic").classList.add("on");
}

function stopMic() {
  if (state.micNode) {
    state.micNode.source.disconnect();
    state.micNode.node.disconnect();
    state.micNode.node.port.onmessage = null;
  }
  if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
  state.mic = state.micNode = null;
  $("mic").textContent = "Start microphone";
  $("mic").classList.remove("on");
  $("level").value = 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Camera

async function toggleCamera() {
  if (state.camera) return stopCamera();
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (e) {
    return setStatus(`camera: ${e.message} (browsers allow it on localhost or HTTPS only)`, "error");
  }
  $("preview").srcObject = state.camera;
  await $("preview").play().catch(() => {});
  $("camera").textContent = "Stop camera";
  $("camera").classList.add("on");
  $("snap").disabled = false;
}

function stopCamera() {
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  state.camera = null;
  $("preview").srcObject = null;
  $("camera").textContent = "Start camera";
  $("camera").classList.remove("on");
  $("snap").disabled = true;
}

function frame() {
  const video = $("preview");
  if (!state.camera || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return canvas.toDataURL("image/jpeg", 0.85);
}

// One frame waits for the next answer at a time (the server keeps at most 8 images for a turn).
function attachFrame(force = false) {
  if (state.imageWaiting && !force) return;
  const url = frame();
  if (!url) return;
  send({ type: "conversation.item.create",
         item: { type: "message", role: "user", content: [{ type: "input_image", image_url: url }] } });
  state.imageWaiting = true;
  $("sent-frame").src = url;
}

// ---------------------------------------------------------------------------------------------------------------
// Text

function sendText(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  const content = [{ type: "input_text", text }];
  const url = state.imageWaiting ? null : frame();
  if (url) {
    content.push({ type: "input_image", image_url: url });
    state.imageWaiting = true;
    $("sent-frame").src = url;
  }
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
  if (!state.response) send({ type: "response.create" });
  $("text").value = "";
}

// ---------------------------------------------------------------------------------------------------------------
// Playback and truncation

function playChunk(itemId, b64) {
  const ctx = state.ctx;
  if (!state.play || state.play.itemId !== itemId) {
    stopPlayback();
    state.play = { itemId, chunks: [], sources: [], next: 0, ms: 0, cut: false };
  }
  const play = state.play;
  if (play.cut) return;
  const pcm = new Int16Array(unbase64(b64));
  const buffer = ctx.createBuffer(1, pcm.length, OUTPUT_RATE);
  const samples = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const start = Math.max(ctx.currentTime + 0.05, play.next);
  source.start(start);
  const ms = (pcm.length / OUTPUT_RATE) * 1000;
  play.chunks.push({ start, ms, offsetMs: play.ms });
  play.sources.push(source);
  play.next = start + ms / 1000;
  play.ms += ms;
}

function playedMs() {
  const play = state.play;
  if (!play) return 0;
  const now = state.ctx.currentTime;
  let played = 0;
  for (const c of play.chunks) {
    if (now < c.start) break;
    played = c.offsetMs + Math.min(c.ms, (now - c.start) * 1000);
  }
  return Math.round(played);
}

function stopPlayback() {
  if (!state.play) return;
  for (const s of state.play.sources) {
    try { s.stop(); } catch (e) { /* not started yet */ }
  }
  state.play.sources = [];
}

// The answer was stopped (barge-in or Stop): silence it and tell the server how much of it was heard.
function cutPlayback(itemId) {
  const play = state.play;
  if (!play || play.itemId !== itemId || play.cut) return;
  const heard = playedMs();
  play.cut = true;
  stopPlayback();
  send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: heard });
}

function stopAnswer() {
  if (state.response) send({ type: "response.cancel" });
  else if (state.play) cutPlayback(state.play.itemId);
}

setInterval(() => {
  if (state.play && !state.play.cut) $("playback").textContent = `played ${playedMs()} ms`;
}, 200);

// ---------------------------------------------------------------------------------------------------------------
// Conversation and timeline

function bubble(itemId, kind, text) {
  let li = state.bubbles.get(itemId);
  if (!li) {
    li = document.createElement("li");
    li.className = kind;
    li.dataset.item = itemId;
    $("conversation").append(li);
    state.bubbles.set(itemId, li);
    if (text !== undefined) li.textContent = text;
  }
  return li;
}

function userBubble(item) {
  const li = bubble(item.id, "user", "");
  for (const part of item.content || []) {
    if (part.type === "input_text") li.append(part.text);
    else if (part.type === "input_audio") li.append("(spoken question)");
    else if (part.type === "input_image") {
      const img = document.createElement("img");
      img.src = part.image_url;
      li.append(img);
    }
  }
}

const AUDIO_EVENTS = new Set(["input_audio_buffer.append", "response.output_audio.delta"]);

// Audio payloads are elided in the JSON shown; every other field is kept.
function elide(ev) {
  return JSON.stringify(ev, (k, v) => {
    if ((k === "audio" || k === "delta") && typeof v === "string" && AUDIO_EVENTS.has(ev.type)) return `<${v.length} base64 chars>`;
    if (k === "image_url" && typeof v === "string" && v.length > 80) return v.slice(0, 40) + `…<${v.length} chars>`;
    return v;
  }, 1);
}

function summary(ev) {
  switch (ev.type) {
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": return JSON.stringify(ev.delta);
    case "response.done": return `${ev.response.status}${ev.response.status_details && ev.response.status_details.reason ? " (" + ev.response.status_details.reason + ")" : ""}`;
    case "error": return `${ev.error.code}: ${ev.error.message}`;
    case "vita.utterance.ignored": return `not for the assistant (${ev.state_token}, ${ev.latency_ms} ms)`;
    case "input_audio_buffer.speech_started": return `at ${ev.audio_start_ms} ms`;
    case "input_audio_buffer.speech_stopped": return `at ${ev.audio_end_ms} ms`;
    case "conversation.item.added":
    case "conversation.item.done": return `${ev.item.role} ${(ev.item.content || []).map((p) => p.type).join("+")}`;
    case "conversation.item.truncate":
    case "conversation.item.truncated": return `at ${ev.audio_end_ms} ms`;
    default: return "";
  }
}

function record(ev, direction) {
  const timeline = $("timeline");
  // Runs of audio appends and audio deltas (interleaved as they are while an answer plays) are one row each, with a
  // count; their JSON shows the last one. Any other event ends the runs.
  if (AUDIO_EVENTS.has(ev.type)) {
    const last = state.runs.get(ev.type);
    if (last) {
      last.dataset.count = String(Number(last.dataset.count) + 1);
      last.querySelector(".count").textContent = `×${last.dataset.count}`;
      last.querySelector("pre").textContent = elide(ev);
      return;
    }
  } else {
    state.runs.clear();
  }
  const li = document.createElement("li");
  li.className = direction;
  if (ev.type === "error") li.classList.add("error");
  if (ev.type.startsWith("vita.")) li.classList.add("ext");
  if (ev.type === "response.done") li.classList.add("done");
  li.dataset.type = ev.type;
  li.dataset.direction = direction;
  li.dataset.count = "1";
  const details = document.createElement("details");
  const head = document.createElement("summary");
  const time = new Date().toISOString().slice(11, 23);
  head.innerHTML = `<span class="time"></span><span class="dir"></span> <span class="type"></span> <span class="text"></span><span class="count"></span>`;
  head.querySelector(".time").textContent = time;
  head.querySelector(".dir").textContent = direction === "server" ? "▼" : "▲";
  head.querySelector(".type").textContent = ev.type;
  head.querySelector(".text").textContent = summary(ev);
  const pre = document.createElement("pre");
  pre.className = "json";
  pre.textContent = elide(ev);
  details.append(head, pre);
  li.append(details);
  timeline.append(li);
  if (AUDIO_EVENTS.has(ev.type)) state.runs.set(ev.type, li);
  while (timeline.childElementCount > MAX_ROWS) timeline.firstElementChild.remove();
  const pane = timeline.parentElement;
  if (pane.scrollHeight - pane.scrollTop - pane.clientHeight < 200) pane.scrollTop = pane.scrollHeight;
}

// ---------------------------------------------------------------------------------------------------------------
// base64 of PCM (btoa takes a binary string; done in slices to stay within argument limits)

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function unbase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

// ---------------------------------------------------------------------------------------------------------------

$("connect-form").addEventListener("submit", connect);
$("disconnect").addEventListener("click", disconnect);
$("mic").addEventListener("click", toggleMic);
$("camera").addEventListener("click", toggleCamera);
$("snap").addEventListener("click", () => attachFrame(true));
$("stop").addEventListener("click", stopAnswer);
$("text-form").addEventListener("submit", sendText);
$("clear").addEventListener("click", () => { $("timeline").replaceChildren(); state.runs.clear(); });
$("modality").addEventListener("change", configure);
window.vitaConsole = state;  // for the browser's devtools
