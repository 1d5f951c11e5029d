// Corral web chat and arena: plain JavaScript over the server's OpenAI-compatible API.
//
// Replies stream in through fetch() + a ReadableStream reader of the server-sent events
// ("data: {json}" lines, ending with "data: [DONE]"). Replies are shown as Markdown by markdown.js,
// which builds DOM nodes from text and never parses HTML; everything else the model or the server
// sends is written with textContent. Tool calls in a reply are shown, never run. URLs are relative,
// so the page also works behind a path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    body: document.body,
    modeChat: $("mode-chat"), modeArena: $("mode-arena"), chatView: $("chat-view"), arenaView: $("arena-view"),
    model: $("model"), settingsToggle: $("settings-toggle"), settings: $("settings"),
    system: $("system"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    repetitionPenalty: $("repetition-penalty"), apiKey: $("api-key"), rememberKey: $("remember-key"),
    errorBar: $("error-bar"), error: $("error"), errorClose: $("error-close"),
    messages: $("messages"), chatEmpty: $("chat-empty"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    arenaComposer: $("arena-composer"), arenaPrompt: $("arena-prompt"), arenaSend: $("arena-send"),
    newRound: $("new-round"), arenaNote: $("arena-note"), arenaQuestion: $("arena-question"),
    names: { a: $("name-a"), b: $("name-b") }, replies: { a: $("reply-a"), b: $("reply-b") },
    voteBar: $("vote-bar"), voteButtons: Array.from(document.querySelectorAll("#vote-bar button")),
    arenaStatus: $("arena-status"),
  };

  // ---------------------------------------------------------------- settings, kept in this browser
  // Sampling settings live in localStorage. The API key is a secret: by default it lives in sessionStorage
  // (gone when the tab closes); only a ticked "Remember on this device" also writes it to localStorage, and
  // unticking deletes it from there. A key found in localStorage on load was remembered, so the box shows ticked.
  const SETTINGS = {
    system: el.system, temperature: el.temperature, top_p: el.topP, max_tokens: el.maxTokens,
    repetition_penalty: el.repetitionPenalty,
  };
  const KEY_NAME = "api_key";
  // Storage can throw (disabled storage, a sandboxed frame): the page then just does not keep the value.
  function storage(kind) {
    return {
      get(key) { try { return window[kind].getItem("corral." + key); } catch { return null; } },
      set(key, value) { try { window[kind].setItem("corral." + key, value); } catch { /* not kept */ } },
      remove(key) { try { window[kind].removeItem("corral." + key); } catch { /* nothing kept */ } },
    };
  }
  const store = storage("localStorage");
  const session = storage("sessionStorage");

  function saveKey() {
    const key = el.apiKey.value;
    if (key) session.set(KEY_NAME, key); else session.remove(KEY_NAME);
    if (el.rememberKey.checked && key) store.set(KEY_NAME, key); else store.remove(KEY_NAME);
  }

  function loadSettings() {
    for (const [key, input] of Object.entries(SETTINGS)) {
      const saved = store.get(key);
      if (saved !== null) input.value = saved;
      input.addEventListener("input", () => store.set(key, input.value));
    }
    const remembered = store.get(KEY_NAME);
    el.rememberKey.checked = remembered !== null;
    el.apiKey.value = session.get(KEY_NAME) ?? remembered ?? "";
    el.apiKey.addEventListener("input", saveKey);
    el.rememberKey.addEventListener("change", saveKey);
  }

  function number(input, label, { integer = false } = {}) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${label}: "${raw}" is not ${integer ? "a whole number" : "a number"}`);
    }
    return value;
  }

  /** The sampling fields of a request; the server validates ranges and names a bad parameter. */
  function samplingParams() {
    const params = {
      temperature: number(el.temperature, "Temperature"),
      top_p: number(el.topP, "Top-p"),
      max_tokens: number(el.maxTokens, "Max tokens", { integer: true }),
      repetition_penalty: number(el.repetitionPenalty, "Repetition penalty"),
    };
    for (const key of Object.keys(params)) if (params[key] === undefined) delete params[key];
    return params;
  }

  function withSystem(messages) {
    const system = el.system.value.trim();
    return system ? [{ role: "system", content: system }, ...messages] : messages;
  }

  // ---------------------------------------------------------------- errors
  function showError(message, source = "") {
    el.error.textContent = message;
    el.error.dataset.source = source;
    el.errorBar.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.dataset.source = "";
    el.errorBar.hidden = true;
  }

  // ---------------------------------------------------------------- HTTP
  class APIError extends Error {
    constructor(message, status) { super(message); this.name = "APIError"; this.status = status; }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorFrom(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = `Error ${response.status}: ${body.error.message}`;
    } catch { /* not JSON: keep the status line */ }
    return new APIError(message, response.status);
  }

  async function request(path, init = {}) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: headers() });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new APIError(`Cannot reach the server (${e.message})`, 0);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  /**
   * POST a streaming chat completion; call onText(piece) for each piece of the reply, and
   * onToolCalls(calls) with the calls assembled so far whenever a tool-call delta arrives.
   * Resolves with the finish reason; rejects with an AbortError when `signal` aborts.
   */
  async function streamChat(body, signal, onText, onToolCalls = () => {}) {
    const response = await request("v1/chat/completions", {
      method: "POST", body: JSON.stringify({ ...body, stream: true }), signal,
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    const calls = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).replace(/^ /, "");
        if (data === "[DONE]") return finish;
        let chunk;
        try { chunk = JSON.parse(data); } catch { throw new APIError("The server sent an unreadable stream event", 0); }
        if (chunk.error) throw new APIError(chunk.error.message || "generation failed", 500);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.delta && Array.isArray(choice.delta.tool_calls)) {
          addToolCallDeltas(calls, choice.delta.tool_calls);
          onToolCalls(calls);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    throw new APIError("The connection closed before the reply was complete", 0);
  }

  /** OpenAI's streamed tool calls: the first delta of a call has its id and name, later ones add arguments. */
  function addToolCallDeltas(calls, deltas) {
    for (const delta of deltas) {
      const index = Number.isInteger(delta.index) ? delta.index : calls.length;
      const call = calls[index] || (calls[index] = { id: "", name: "", arguments: "" });
      if (delta.id) call.id = delta.id;
      const fn = delta.function || {};
      if (fn.name) call.name += fn.name;
      if (typeof fn.arguments === "string") call.arguments += fn.arguments;
    }
  }

  // ---------------------------------------------------------------- rendering
  /** A reply as Markdown, then its tool calls; the source is kept on the element (what was received). */
  function showReply(container, text, calls = []) {
    container.dataset.markdown = text;
    window.CorralMarkdown.render(container, text);
    if (calls.length) container.append(toolCallsView(calls));
  }

  /** Tool calls, readably: the function's name and its arguments (pretty JSON when they parse). */
  function toolCallsView(calls) {
    const box = document.createElement("div");
    box.className = "tool-calls";
    for (const call of calls.filter(Boolean)) {
      const item = document.createElement("div");
      item.className = "tool-call";
      item.dataset.name = call.name;
      const head = document.createElement("div");
      head.className = "tool-head";
      const name = document.createElement("code");
      name.textContent = call.name || "(unnamed)";
      head.append("Tool call ", name);
      const args = document.createElement("pre");
      let shown = call.arguments;
      try { shown = JSON.stringify(JSON.parse(call.arguments), null, 2); } catch { /* still streaming: as sent */ }
      args.textContent = shown;
      item.append(head, args);
      box.append(item);
    }
    return box;
  }

  // ---------------------------------------------------------------- models
  let models = [];

  async function loadModels() {
    try {
      const response = await request("v1/models");
      const body = await response.json();
      models = (body.data || []).map((m) => m.id);
    } catch (e) {
      models = [];
      fillModelPicker();
      showError(e.message + (e.status === 401 ? ". Enter the API key under Settings." : ""), "models");
      if (e.status === 401) openSettings(true, el.apiKey);
      return;
    }
    fillModelPicker();
    if (el.error.dataset.source === "models") clearError();
  }

  function fillModelPicker() {
    const wanted = el.model.value || store.get("model");
    el.model.replaceChildren();
    el.model.disabled = !models.length;
    if (!models.length) {
      el.model.append(new Option("(no models)", ""));
      return;
    }
    for (const id of models) el.model.append(new Option(id, id));
    if (models.includes(wanted)) el.model.value = wanted;
  }

  // ---------------------------------------------------------------- layout helpers
  function autosize(textarea) {
    textarea.style.height = "auto";
    textarea.style.height = Math.min(textarea.scrollHeight + 2, 240) + "px";
  }

  function nearBottom(node) {
    return node.scrollHeight - node.scrollTop - node.clientHeight < 80;
  }

  function openSettings(open, focus) {
    el.settings.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open && focus) focus.focus();
  }

  function setMode(mode) {
    el.body.dataset.mode = mode;
    const arena = mode === "arena";
    el.chatView.hidden = arena;
    el.arenaView.hidden = !arena;
    el.modeChat.setAttribute("aria-selected", String(!arena));
    el.modeArena.setAttribute("aria-selected", String(arena));
    (arena ? el.arenaPrompt : el.prompt).focus();
  }

  function submitOnEnter(textarea, submit) {
    textarea.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submit();
      }
    });
    textarea.addEventListener("input", () => autosize(textarea));
  }

  // ---------------------------------------------------------------- chat
  const chat = { history: [], controller: null };

  function addBubble(role, text) {
    const bubble = document.createElement("div");
    bubble.className = `msg ${role}`;
    bubble.dataset.role = role;
    bubble.textContent = text;
    el.chatEmpty.hidden = true;
    el.messages.append(bubble);
    return bubble;
  }

  function setChatBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.body.dataset.streaming = String(busy);
  }

  async function sendChat() {
    if (chat.controller) return;
    const text = el.prompt.value;
    if (!text.trim()) return;
    const model = el.model.value;
    if (!model) {
      showError("No model to talk to: check that the server is running, and the API key under Settings.");
      return;
    }
    let params;
    try { params = samplingParams(); } catch (e) { showError(e.message); return; }
    clearError();

    el.prompt.value = "";
    autosize(el.prompt);
    chat.history.push({ role: "user", content: text });
    const userBubble = addBubble("user", text);
    const bubble = addBubble("assistant", "");
    Object.assign(bubble.dataset, { model, chunks: "0", done: "false" });
    bubble.classList.add("streaming");
    el.messages.scrollTop = el.messages.scrollHeight;

    const controller = new AbortController();
    chat.controller = controller;
    setChatBusy(true);
    let reply = "";
    let calls = [];
    let failure = null;
    const update = () => {
      const follow = nearBottom(el.messages);
      showReply(bubble, reply, calls);
      bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
      if (follow) el.messages.scrollTop = el.messages.scrollHeight;
    };
    try {
      const finish = await streamChat({ model, messages: withSystem(chat.history), ...params }, controller.signal,
        (piece) => { reply += piece; update(); }, (assembled) => { calls = assembled; update(); });
      bubble.dataset.finish = finish || "";
    } catch (e) {
      if (e.name === "AbortError") bubble.dataset.stopped = "true";
      else failure = e;
    }
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";

    if (chat.controller === controller) {  // not cleared by "New chat" meanwhile
      if (reply || calls.length) {
        // The page runs no tools, so a call is kept on screen but not in the history: a call sent back
        // without its result would be refused by the server.
        chat.history.push({ role: "assistant", content: reply });
        if (!reply.trim() && !calls.length) bubble.classList.add("empty");
        if (failure) bubble.dataset.failed = "true";
      } else if (failure || bubble.dataset.stopped) {
        // Nothing came back: take the turn back and put the text back in the box to retry or edit.
        chat.history.pop();
        userBubble.remove();
        bubble.remove();
        el.chatEmpty.hidden = chat.history.length > 0;
        if (!el.prompt.value) { el.prompt.value = text; autosize(el.prompt); }
      } else {
        bubble.classList.add("empty");
        chat.history.push({ role: "assistant", content: "" });
      }
      chat.controller = null;
      setChatBusy(false);
      if (failure) showError(failure.message);
      el.prompt.focus();
    }
  }

  function stopChat() {
    if (chat.controller) chat.controller.abort();
  }

  function newChat() {
    const running = chat.controller;
    chat.controller = null;
    if (running) running.abort();
    chat.history = [];
    el.messages.replaceChildren(el.chatEmpty);
    el.chatEmpty.hidden = false;
    setChatBusy(false);
    clearError();
    el.prompt.focus();
  }

  // ---------------------------------------------------------------- arena
  let round = null;

  function pickTwo(list) {
    if (list.length === 1) return [list[0], list[0]];
    const first = Math.floor(Math.random() * list.length);
    let second = Math.floor(Math.random() * (list.length - 1));
    if (second >= first) second += 1;
    return [list[first], list[second]];
  }

  function resetArena() {
    if (round) round.controller.abort();
    round = null;
    for (const side of ["a", "b"]) {
      el.names[side].textContent = `Model ${side.toUpperCase()}`;
      el.names[side].classList.remove("revealed");
      el.replies[side].textContent = "";
      el.replies[side].className = "reply";
      for (const key of ["done", "chunks", "failed", "stopped", "markdown"]) delete el.replies[side].dataset[key];
    }
    el.voteBar.hidden = true;
    for (const button of el.voteButtons) { button.disabled = false; button.classList.remove("chosen"); }
    el.arenaNote.hidden = true;
    el.arenaQuestion.hidden = true;
    el.arenaQuestion.textContent = "";
    el.arenaStatus.textContent = "";
    el.arenaSend.disabled = false;
    el.body.dataset.arenaStreaming = "false";
  }

  async function sendArena() {
    if (round && round.busy) return;
    const prompt = el.arenaPrompt.value;
    if (!prompt.trim()) return;
    if (!models.length) {
      showError("No model to ask: check that the server is running, and the API key under Settings.");
      return;
    }
    let params;
    try { params = samplingParams(); } catch (e) { showError(e.message); return; }
    clearError();
    resetArena();

    const [modelA, modelB] = pickTwo(models);
    const current = {
      prompt, models: { a: modelA, b: modelB }, replies: { a: "", b: "" },
      controller: new AbortController(), busy: true, voted: false,
    };
    round = current;
    el.arenaPrompt.value = "";
    autosize(el.arenaPrompt);
    el.arenaQuestion.textContent = prompt;
    el.arenaQuestion.hidden = false;
    el.arenaNote.hidden = modelA !== modelB;
    el.arenaSend.disabled = true;
    el.body.dataset.arenaStreaming = "true";
    el.arenaStatus.textContent = "Both models are answering…";

    const messages = withSystem([{ role: "user", content: prompt }]);
    const run = async (side) => {
      const panel = el.replies[side];
      Object.assign(panel.dataset, { chunks: "0", done: "false" });
      panel.classList.add("streaming");
      try {
        await streamChat({ model: current.models[side], messages, ...params }, current.controller.signal, (piece) => {
          current.replies[side] += piece;
          showReply(panel, current.replies[side]);
          panel.dataset.chunks = String(Number(panel.dataset.chunks) + 1);
        });
      } catch (e) {
        if (e.name !== "AbortError") panel.dataset.failed = "true";
        throw e;
      } finally {
        panel.classList.remove("streaming");
        if (!current.replies[side].trim()) panel.classList.add("empty");
        panel.dataset.done = "true";
      }
    };
    const results = await Promise.allSettled([run("a"), run("b")]);
    if (round !== current) return;  // "New round" meanwhile
    current.busy = false;
    el.arenaSend.disabled = false;
    el.body.dataset.arenaStreaming = "false";
    const failed = results.find((r) => r.status === "rejected" && r.reason.name !== "AbortError");
    if (failed) {
      showError(failed.reason.message);
      el.arenaStatus.textContent = "A reply failed, so this round cannot be voted on. Start a new round.";
      return;
    }
    el.voteBar.hidden = false;
    el.arenaStatus.textContent = "Which reply is better?";
    el.voteButtons[0].focus();
  }

  async function vote(choice, button) {
    const current = round;
    if (!current || current.busy || current.voted) return;
    for (const b of el.voteButtons) b.disabled = true;
    try {
      await request("v1/arena/vote", {
        method: "POST",
        body: JSON.stringify({
          prompt: current.prompt, model_a: current.models.a, model_b: current.models.b,
          reply_a: current.replies.a, reply_b: current.replies.b, vote: choice,
        }),
      });
    } catch (e) {
      if (round === current) for (const b of el.voteButtons) b.disabled = false;
      showError(e.message);
      return;
    }
    if (round !== current) return;
    current.voted = true;
    button.classList.add("chosen");
    for (const side of ["a", "b"]) {
      el.names[side].textContent = current.models[side];
      el.names[side].classList.add("revealed");
    }
    clearError();
    el.arenaStatus.textContent = "Thanks, your vote was recorded. Press New round for another prompt.";
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    loadSettings();
    el.modeChat.addEventListener("click", () => setMode("chat"));
    el.modeArena.addEventListener("click", () => setMode("arena"));
    el.settingsToggle.addEventListener("click", () => openSettings(el.settings.hidden));
    el.errorClose.addEventListener("click", clearError);
    el.model.addEventListener("change", () => store.set("model", el.model.value));

    let keyTimer = null;
    el.apiKey.addEventListener("input", () => {
      clearTimeout(keyTimer);
      keyTimer = setTimeout(loadModels, 300);
    });

    el.composer.addEventListener("submit", (e) => { e.preventDefault(); sendChat(); });
    submitOnEnter(el.prompt, sendChat);
    el.stop.addEventListener("click", stopChat);
    el.newChat.addEventListener("click", newChat);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && chat.controller && el.body.dataset.mode === "chat") stopChat();
    });

    el.arenaComposer.addEventListener("submit", (e) => { e.preventDefault(); sendArena(); });
    submitOnEnter(el.arenaPrompt, sendArena);
    el.newRound.addEventListener("click", () => { resetArena(); clearError(); el.arenaPrompt.focus(); });
    for (const button of el.voteButtons) button.addEventListener("click", () => vote(button.dataset.vote, button));

    setChatBusy(false);
    resetArena();
    loadModels();
    el.prompt.focus();
  }

  init();
})();
