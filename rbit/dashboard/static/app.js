// rbit dashboard: builds every element with textContent (never HTML from data: job
// ids and messages come from publishers and runners).
"use strict";

const state = { session: null, page: 1, jobTimer: null, openJob: null, queues: [] };

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "className") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function firstLine(value) { return text(value).split("\n")[0]; }

function text(value) { return value === null || value === undefined ? "-" : String(value); }

function when(unix) {
  if (typeof unix !== "number") return "-";
  return new Date(unix * 1000).toLocaleString();
}

function seconds(value) {
  if (typeof value !== "number") return "-";
  if (value < 120) return value.toFixed(value < 10 ? 2 : 0) + " s";
  if (value < 7200) return (value / 60).toFixed(0) + " min";
  return (value / 3600).toFixed(1) + " h";
}

function usage(value) {
  if (!value || typeof value !== "object") return "-";
  let out = "cpu " + seconds(value.cpu_s);
  if (typeof value.max_rss_kib === "number") out += ", peak " + Math.round(value.max_rss_kib / 1024) + " MiB";
  return out;
}

function badge(label, kind) { return el("span", { className: "badge " + (kind || "") }, label); }

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  if (!response.ok) {
    const reason = (await response.text()).trim();
    const error = new Error(reason || response.statusText);
    error.status = response.status;
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

async function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf || "" },
    body: JSON.stringify(body),
  });
}

function say(message, isError) {
  const node = isError ? $("error") : $("notice");
  node.textContent = message;
  node.hidden = !message;
}

function canAct() { return state.session && state.session.actions; }

function actionButton(label, handler, danger) {
  if (!canAct()) return null;
  return el("button", { className: danger ? "danger action" : "action", onclick: handler }, label);
}

async function act(path, body, what) {
  try {
    const result = await post(path, body);
    const failed = (result.answers || []).filter((a) => !a.ok);
    if (failed.length) say(what + ": " + failed.map((a) => text(a.worker) + ": " + text(a.error)).join("; "), true);
    else say(what + ": done" + (result.message ? " (" + result.message + ")" : ""), false);
  } catch (error) {
    say(what + ": " + error.message, true);
  }
  refresh();
}

// ------------------------------------------------------------------ fleet

function workerRow(worker, answered) {
  const queues = el("td");
  for (const item of worker.queues || []) {
    const kind = item.paused ? "paused" : item.consuming ? "on" : "off";
    queues.append(badge(text(item.queue) + (item.paused ? " (paused)" : ""), kind));
  }
  const running = el("td");
  for (const job of worker.running || []) {
    running.append(el("div", {}, text(job.job_id) + " on " + text(job.queue) + " since " + when(job.since)));
  }
  const connected = worker.broker_connected === undefined ? "-" : worker.broker_connected ? "yes" : "no";
  return el("tr", { "data-worker": text(worker.name) },
    el("td", {}, text(worker.name)), el("td", {}, text(worker.host)), el("td", {}, text(worker.version)),
    el("td", {}, seconds(worker.uptime)), el("td", {}, connected), queues, running,
    el("td", {}, answered ? badge("answered", "on") : badge("missing", "missing")),
    el("td", {}, answered ? actionButton("Shut down", () => {
      if (confirm("Shut down worker " + worker.name + "?")) act("/api/shutdown", { worker: worker.name }, "shut down " + worker.name);
    }, true) : null));
}

function queueRow(item) {
  const paused = item.paused_on || [];
  return el("tr", { "data-queue": text(item.queue) },
    el("td", {}, text(item.queue)), el("td", {}, text(item.ready)), el("td", {}, text(item.running)),
    el("td", {}, text(item.consumers)), el("td", {}, text(item.dead)),
    el("td", { className: "paused-on" }, ...(paused.length ? paused.map((w) => badge(w, "paused")) : ["-"])),
    el("td", {},
      (item.consuming_on || []).length ? actionButton("Pause", () => act("/api/pause", { queue: item.queue }, "pause " + item.queue)) : null,
      paused.length ? actionButton("Resume", () => act("/api/resume", { queue: item.queue }, "resume " + item.queue)) : null));
}

function deadSection(queue, letters) {
  const rows = letters.map((d) => el("tr", {},
    el("td", {}, text(d.job_id)), el("td", { className: "msg" }, text(d.reason)),
    el("td", {}, text(d.attempts)), el("td", {}, text(d.worker)), el("td", {}, text(d.time))));
  return el("div", { "data-dead": queue },
    el("h3", {}, queue + " ",
      actionButton("Replay all", () => act("/api/replay", { queue }, "replay " + queue)),
      actionButton("Purge", () => {
        if (confirm("Delete every dead letter of " + queue + "? This cannot be undone.")) {
          act("/api/purge", { queue, confirm: queue }, "purge " + queue);
        }
      }, true)),
    el("table", {}, el("thead", {}, el("tr", {}, ...["job", "reason", "tries", "worker", "time"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
}

function showFleet(fleet) {
  $("error").hidden = !fleet.error;
  if (fleet.error) $("error").textContent = "broker: " + fleet.error;
  $("refreshed").textContent = fleet.time ? "refreshed " + new Date(fleet.time * 1000).toLocaleTimeString() : "";
  $("live").textContent = fleet.live ? "live: on" : "live: off";
  $("live").className = "badge " + (fleet.live ? "on" : "off");
  const rows = (fleet.workers || []).map((w) => workerRow(w, true))
    .concat((fleet.missing || []).map((m) => workerRow(m, false)));
  fill($("workers").tBodies[0], rows);
  fill($("queues").tBodies[0], (fleet.queues || []).map(queueRow));
  fill($("schedules").tBodies[0], (fleet.schedules || []).map((s) => el("tr", {},
    el("td", {}, text(s.name)), el("td", {}, text(s.trigger)), el("td", {}, text(s.leader)),
    el("td", {}, text(s.last_fire)), el("td", {}, text(s.next_fire)))));
  const dead = fleet.dead || {};
  $("dead").replaceChildren(...Object.keys(dead).sort().map((q) => deadSection(q, dead[q])));
  if (!Object.keys(dead).length) $("dead").append(el("p", {}, "none"));
  const names = (fleet.queues || []).map((q) => q.queue);
  if (names.join("\n") !== state.queues.join("\n")) {
    state.queues = names;
    const select = $("filter-queue");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "any"), ...names.map((n) => el("option", { value: n }, n)));
    select.value = names.includes(chosen) ? chosen : "";
  }
}

// ------------------------------------------------------------------- jobs

async function loadJobs() {
  const query = new URLSearchParams({ queue: $("filter-queue").value, status: $("filter-status").value, page: state.page, per_page: 50 });
  const result = await api("/api/jobs?" + query);
  state.page = result.page;
  $("page").textContent = " page " + result.page + " of " + result.pages + " (" + result.total + " jobs) ";
  fill($("jobs").tBodies[0], result.rows.map((row) => el("tr", { "data-job": text(row.job_id) },
    el("td", {}, when(row.ended)),
    el("td", {}, el("a", { className: "job", onclick: () => openJob(row.job_id) }, text(row.job_id))),
    el("td", {}, text(row.queue)), el("td", {}, badge(text(row.status), row.status)),
    el("td", {}, seconds(row.duration)), el("td", {}, usage(row.usage)), el("td", {}, text(row.worker)),
    el("td", { className: "msg", title: text(row.message) }, firstLine(row.message)))));
}

function jobsSoon() {
  if (state.jobTimer) return;
  state.jobTimer = setTimeout(() => { state.jobTimer = null; loadJobs().catch(() => {}); }, 500);
}

async function openJob(jobId) {
  state.openJob = jobId;
  const job = await api("/api/job?" + new URLSearchParams({ id: jobId }));
  $("job-id").textContent = jobId;
  const items = job.statuses.map((s) => el("li", {}, text(s.time) + " ", badge(text(s.status), s.status), " " + text(s.worker),
    el("div", { className: "msg" }, text(s.message))));
  if (!items.length) {
    for (const o of job.outcomes) items.push(el("li", {}, when(o.ended) + " ", badge(text(o.status), o.status), " " + text(o.worker) + " " + text(o.message)));
  }
  $("job-statuses").replaceChildren(...items);
  $("job").hidden = false;
}

// ------------------------------------------------------------------ live

function follow() {
  const source = new EventSource("/api/events");
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const ticker = $("ticker");
    ticker.prepend(el("li", {}, text(event.time) + " " + text(event.job_id) + " " + text(event.queue) + " ",
      badge(text(event.status), event.status), " " + firstLine(event.message)));
    while (ticker.children.length > 50) ticker.lastChild.remove();
    if (["Done", "Failed", "Cancelled", "Uploaded"].includes(event.status)) jobsSoon();
    if (state.openJob === event.job_id) openJob(event.job_id).catch(() => {});
  };
}

// ----------------------------------------------------------------- start

async function refresh() {
  try {
    showFleet(await api("/api/fleet"));
    await loadJobs();
  } catch (error) {
    if (error.status === 401) return showLogin();
    say("cannot reach the dashboard: " + error.message, true);
  }
}

function showLogin() {
  $("login").hidden = false;
  $("logout").hidden = true;
}

async function start() {
  state.session = await api("/api/session");
  const s = state.session;
  $("mode").textContent = !s.auth_required ? "read-only (no token configured)" : s.actions ? "actions allowed" : "";
  $("logout").hidden = !(s.auth_required && s.csrf);
  if (s.auth_required && !s.authenticated) return showLogin();
  $("login").hidden = true;
  follow();
  await refresh();
  setInterval(refresh, Math.max(2, s.refresh) * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value }) });
      location.reload();
    } catch (error) {
      say("login: " + error.message, true);
    }
  });
  $("logout").addEventListener("click", async () => {
    await post("/api/logout", {}).catch(() => {});
    location.reload();
  });
  $("filter-queue").addEventListener("change", () => { state.page = 1; loadJobs(); });
  $("filter-status").addEventListener("change", () => { state.page = 1; loadJobs(); });
  $("prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); loadJobs(); });
  $("next").addEventListener("click", () => { state.page += 1; loadJobs(); });
  $("job-close").addEventListener("click", () => { state.openJob = null; $("job").hidden = true; });
  start().catch((error) => say("cannot start: " + error.message, true));
});
