// MuseTalk local page: microphone -> bot, avatar video + voice <- bot.
// Pipecat SmallWebRTC signalling: POST /api/offer {sdp, type, pc_id?} -> answer {sdp, type, pc_id};
// PATCH /api/offer {pc_id, candidates: [{candidate, sdp_mid, sdp_mline_index}]}.
// Transceivers: audio first (sendrecv: our microphone, the avatar's voice), then video
// (recvonly: the avatar). No data channel: the bot needs none.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("avatar");
// `?avatar=NAME` picks another prepared avatar for this viewer (each viewer has its own session).
const chosenAvatar = new URLSearchParams(window.location.search).get("avatar") || null;
// `?key=KEY`: the page's key (a page served beyond loopback has one), sent with every API request.
const pageKey = new URLSearchParams(window.location.search).get("key") || null;

function apiHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (pageKey) headers.Authorization = `Bearer ${pageKey}`;
  return headers;
}
const startButton = $("start");
const stopButton = $("stop");

// Exposed for diagnostics (and the end-to-end test): the live peer connection and stream.
window.musetalk = { pc: null, stream: null, mic: null, video, rxFps: null };

let pc = null;
let mic = null;
let pcId = null;
let pendingCandidates = [];
let statusTimer = null;

function setState(text, kind) {
  const el = $("state");
  el.textContent = text;
  el.dataset.kind = kind || "busy";
}

function showError(text) {
  $("error").textContent = text || "";
}

async function sendCandidates(candidates) {
  if (!candidates.length || !pcId) return;
  const body = {
    pc_id: pcId,
    candidates: candidates.map((c) => ({ candidate: c.candidate, sdp_mid: c.sdpMid, sdp_mline_index: c.sdpMLineIndex })),
  };
  try {
    const response = await fetch("/api/offer", {
      method: "PATCH",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!response.ok) console.warn("ICE candidate refused", response.status, await response.text());
  } catch (err) {
    console.warn("ICE candidate not sent", err);
  }
}

function watchFrameRate() {
  // Frames actually shown, counted with requestVideoFrameCallback where the browser has it.
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  let count = 0;
  let since = performance.now();
  const onFrame = (now) => {
    count += 1;
    if (now - since >= 1000) {
      window.musetalk.rxFps = (count * 1000) / (now - since);
      $("rx-fps").textContent = `${window.musetalk.rxFps.toFixed(1)} fps, ${video.videoWidth}x${video.videoHeight}`;
      count = 0;
      since = now;
    }
    if (pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function pollStatus() {
  try {
    const response = await fetch("/api/status", { cache: "no-store", headers: apiHeaders() });
    if (response.status === 401) {
      showError(((await response.json().catch(() => ({}))).detail) || "This page needs its key (?key=...).");
      return;
    }
    if (!response.ok) return;
    const s = await response.json();
    $("avatar-name").textContent = chosenAvatar || s.avatar || "-";
    $("bot-fps").textContent = s.fps == null ? "-" : `${s.fps.toFixed(1)} fps${s.realtime === false ? " (not real time)" : ""}`;
    $("bot-latency").textContent = s.mouth_latency_ms == null ? "-" : `${Math.round(s.mouth_latency_ms)} ms`;
    $("warning").textContent = s.warning || "";
    if (s.mode === "speech") {
      $("how-mode").textContent = "The avatar speaks what the bot says (speech mode); silence shows it idling.";
    }
  } catch (err) {
    /* the bot may be restarting: try again on the next tick */
  }
}

async function start() {
  startButton.disabled = true;
  showError("");
  setState("asking for the microphone", "busy");
  if (!window.isSecureContext || !navigator.mediaDevices) {
    setState("no microphone", "bad");
    showError(
      `Browsers only allow the microphone on https pages or on http://127.0.0.1 / http://localhost. ` +
      `Open this page on the bot's machine as http://127.0.0.1:${location.port || 80}/, ` +
      `or reach it through an SSH tunnel (ssh -L ${location.port || 80}:127.0.0.1:${location.port || 80} ...) or an https proxy.`
    );
    startButton.disabled = false;
    return;
  }
  try {
    mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
  } catch (err) {
    setState("no microphone", "bad");
    showError(`The microphone is needed to drive the avatar: ${err.message}. Allow it and click Start again.`);
    startButton.disabled = false;
    return;
  }
  window.musetalk.mic = mic;

  let iceServers = [];
  try {  // STUN/TURN servers the bot was started with (--ice-servers), for hosts behind NAT
    iceServers = (await (await fetch("/api/ice-servers", { cache: "no-store", headers: apiHeaders() })).json()).iceServers || [];
  } catch (err) {
    iceServers = [];
  }
  pc = new RTCPeerConnection({ iceServers });
  window.musetalk.pc = pc;
  pcId = null;
  pendingCandidates = [];

  pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
  pc.addTransceiver("video", { direction: "recvonly" });

  const remote = new MediaStream();
  window.musetalk.stream = remote;
  video.srcObject = remote;
  pc.ontrack = (event) => {
    remote.addTrack(event.track);
    video.play().catch(() => {});
  };
  pc.onicecandidate = (event) => {
    if (!event.candidate) return;
    if (pcId) sendCandidates([event.candidate]);
    else pendingCandidates.push(event.candidate);
  };
  pc.onconnectionstatechange = () => {
    const s = pc ? pc.connectionState : "closed";
    const labels = {
      new: ["starting", "busy"],
      connecting: ["connecting", "busy"],
      connected: ["connected: speak!", "ok"],
      disconnected: ["connection lost, retrying", "busy"],
      failed: ["connection failed (the bot stopped, or the network blocks WebRTC)", "bad"],
      closed: ["closed", "bad"],
    };
    const [text, kind] = labels[s] || [s, "busy"];
    setState(text, kind);
    if (s === "failed" || s === "closed") stop(false);
  };

  try {
    setState("connecting", "busy");
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const response = await fetch("/api/offer", {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        sdp: pc.localDescription.sdp,
        type: pc.localDescription.type,
        request_data: { avatar: chosenAvatar },
      }),
    });
    if (!response.ok) {
      let detail = await response.text();
      try { detail = JSON.parse(detail).detail || detail; } catch (e) { /* plain text */ }
      throw new Error(`the bot refused the connection (${response.status}): ${detail}`);
    }
    const answer = await response.json();
    pcId = answer.pc_id;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    const queued = pendingCandidates;
    pendingCandidates = [];
    await sendCandidates(queued);
  } catch (err) {
    setState("not connected", "bad");
    showError(`Could not connect: ${err.message}. Is the bot running? Reload the page to try again.`);
    stop(false);
    return;
  }
  stopButton.disabled = false;
  watchFrameRate();
  pollStatus();
  statusTimer = setInterval(pollStatus, 2000);
}

function stop(userAction = true) {
  if (statusTimer) clearInterval(statusTimer);
  statusTimer = null;
  if (pc) {
    const closing = pc;
    pc = null;
    window.musetalk.pc = null;
    closing.onconnectionstatechange = null;
    closing.close();
  }
  if (mic) {
    mic.getTracks().forEach((t) => t.stop());
    mic = null;
  }
  video.srcObject = null;
  if (userAction) setState("stopped", "idle");
  startButton.disabled = false;
  stopButton.disabled = true;
}

startButton.addEventListener("click", start);
stopButton.addEventListener("click", () => stop(true));
window.addEventListener("pagehide", () => stop(false));
pollStatus();
