// The gateway dashboard: renders the JSON API into the page. No build step, no library.
// Every string from the API goes in as text (textContent / createTextNode), never as HTML.
"use strict";

const REFRESH_MS = 3000;
const LOG_POLL_MS = 2000;
const MAX_LOG_LINES = 2000; // the API's most per request (a bounded window of the file)
const SEARCH_DEBOUNCE_MS = 700;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#65a30d"];
const SVG = "http://www.w3.org/2000/svg";

// -- DOM helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function badge(status) {
  const st = String(status || "");
  return h("span", { class: "badge " + st.toLowerCase().replace(/[^a-z_]/g, "") }, st);
}

function link(href, text) { return h("a", { href: href }, text); }
function appHref(name) { return "/apps/" + encodeURIComponent(name); }
function replicaHref(id) { return "/replicas/" + encodeURIComponent(id); }

function when(t) {
  if (t === null || t === undefined || t === 0) return "-";
  const d = new Date(t * 1000);
  return d.toLocaleString();
}

function ago(t, now) {
  if (!t) return "-";
  const s = Math.max(0, (now || Date.now() / 1000) - t);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function mb(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  return (bytes / 1e6).toFixed(1) + " MB";
}

function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))
      : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))));
}

async function api(path) {
  const resp = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (resp.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(path + ": " + msg);
  }
  return resp.json();
}

function showError(err) {
  const el = document.getElementById("error");
  if (!err) { el.hidden = true; el.textContent = ""; return; }
  el.hidden = false;
  el.textContent = String(err.message || err);
}

function tick() {
  const el = document.getElementById("live");
  if (el) el.textContent = "updated " + new Date().toLocaleTimeString();
}

// Re-render a page part every few seconds; keeps going through errors (shown, then cleared).
function every(ms, fn) {
  let busy = false;
  const run = async () => {
    if (busy) return;
    busy = true;
    try { await fn(); showError(null); tick(); } catch (e) { showError(e); }
    busy = false;
  };
  run();
  return setInterval(run, ms);
}

// -- charts: plain SVG ---------------------------------------------------------------------

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

// lines: [{name, values: [[t, v|null], ...]}]; window: [t0, t1]
function chart(title, unit, lines, window, kind) {
  const W = 420, H = 150, L = 44, R = 8, T = 10, B = 20;
  let max = 0;
  let count = 0;
  for (const ln of lines) {
    for (const [, v] of ln.values) {
      if (v !== null && v !== undefined) { max = Math.max(max, v); count++; }
    }
  }
  const top = max > 0 ? max * 1.15 : 1;
  const [t0, t1] = window;
  const x = (t) => L + (W - L - R) * Math.max(0, Math.min(1, (t - t0) / Math.max(1, t1 - t0)));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "data-kind": kind, "data-max": max, "data-points": count });
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    const label = s("text", { x: L - 4, y: y(v) + 3, class: "axis", "text-anchor": "end" });
    label.textContent = fmt(v);
    svg.appendChild(label);
  }
  const span = t1 - t0;
  const spanText = span >= 120 ? "-" + Math.round(span / 60) + " min" : "-" + Math.round(span) + " s";
  for (const [tx, anchor, text] of [[t0, "start", spanText],
    [t1, "end", "now"]]) {
    const label = s("text", { x: x(tx), y: H - 4, class: "axis", "text-anchor": anchor });
    label.textContent = text;
    svg.appendChild(label);
  }
  lines.forEach((ln, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "";
    const vals = ln.values;
    vals.forEach(([t, v], k) => {
      if (v === null || v === undefined) return;
      const before = k > 0 ? vals[k - 1][1] : null;
      const after = k + 1 < vals.length ? vals[k + 1][1] : null;
      const joined = before !== null && before !== undefined;
      d += (joined ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1) + " ";
      if (!joined && (after === null || after === undefined)) {
        // A lone point (one interval with calls between idle ones): a dot, or it would not show.
        svg.appendChild(s("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2,
          fill: color }));
      }
    });
    if (d) svg.appendChild(s("path", { d: d, class: "line", stroke: color, "data-series": ln.name }));
  });
  const legend = h("div", { class: "legend" }, lines.map((ln, i) => {
    const last = [...ln.values].reverse().find(([, v]) => v !== null && v !== undefined);
    return h("span", {}, h("i", { style: null, class: "swatch c" + (i % COLORS.length) }),
      ln.name + " " + (last ? fmt(last[1]) : "-") + (unit ? " " + unit : ""));
  }));
  if (!lines.length) legend.appendChild(h("span", { class: "muted" }, "no errors"));
  return h("figure", { class: "chartbox" }, h("figcaption", {}, title), svg, legend);
}

function charts(ts, now) {
  const pts = ts.points || [];
  // The last 15 minutes, or since the first point when the gateway is younger (a minute at
  // least), so a fresh gateway's charts are not squeezed against the right edge.
  const first = pts.length ? pts[0].t - ts.step_s : now;
  const window = [Math.min(now - 60, Math.max(now - ts.window_s, first)), now];
  const codes = new Set();
  for (const p of pts) for (const c of Object.keys(p.errors_per_s || {})) codes.add(c);
  const errLines = [...codes].sort().map((c) => ({
    name: c, values: pts.map((p) => [p.t, (p.errors_per_s || {})[c] || 0]) }));
  return h("div", { class: "charts" },
    chart("Calls / s", "/s", [{ name: "calls", values: pts.map((p) => [p.t, p.calls_per_s]) }],
      window, "calls"),
    chart("Errors / s by code", "/s", errLines, window, "errors"),
    chart("Latency (ms)", "ms", [
      { name: "P50", values: pts.map((p) => [p.t, p.p50_ms]) },
      { name: "P90", values: pts.map((p) => [p.t, p.p90_ms]) },
      { name: "P99", values: pts.map((p) => [p.t, p.p99_ms]) }], window, "latency"));
}

async function chartsFor(app, deployment, now) {
  let q = "/api/gateway/timeseries?application=" + encodeURIComponent(app);
  if (deployment) q += "&deployment=" + encodeURIComponent(deployment);
  return charts(await api(q), now);
}

function replicaStates(counts) {
  const parts = Object.entries(counts || {}).sort();
  if (!parts.length) return h("span", { class: "muted" }, "none");
  return h("span", { class: "states" }, parts.map(([st, n]) =>
    h("span", { class: "state" }, badge(st), " " + n)));
}

// -- pages ---------------------------------------------------------------------------------

async function overview(root) {
  const [ov, serve] = await Promise.all([api("/api/gateway/overview"),
    api("/api/serve/applications/")]);
  const a = ov.addresses;
  const addr = h("dl", { class: "facts" },
    h("dt", {}, "Gateway"), h("dd", {}, badge(ov.state), " since " + when(ov.started_at)),
    h("dt", {}, "gRPC"), h("dd", {}, h("code", {}, a.grpc)),
    h("dt", {}, "HTTP"), h("dd", {}, a.http ? h("code", {}, a.http) : "off"),
    h("dt", {}, "Admin"), h("dd", {}, a.admin ? h("code", {}, a.admin) : "-"),
    h("dt", {}, "Metrics"), h("dd", {}, a.metrics ? link(a.metrics, a.metrics) : "off"),
    h("dt", {}, "Prometheus"), h("dd", {}, a.prometheus ? link(a.prometheus, a.prometheus)
      : h("span", { class: "muted" }, "not configured (dashboard.prometheus_url)")));
  const proxies = table(["Node", "Protocol", "Address", "Status"],
    Object.entries(serve.proxies).map(([node, p]) =>
      [node, p.protocol || "gRPC", h("code", {}, p.address || ""), badge(p.status)]));
  const apps = Object.values(serve.applications);
  const appRows = apps.map((app) => {
    const counts = {};
    for (const d of Object.values(app.deployments)) {
      for (const [st, n] of Object.entries(d.replica_states || {})) counts[st] = (counts[st] || 0) + n;
    }
    return [link(appHref(app.name), app.name), badge(app.status),
      h("span", { class: "msg" }, app.message || ""),
      (app.route_prefix || "-") + " / " + app.ingress_deployment,
      when(app.last_deployed_time_s), replicaStates(counts)];
  });
  const sections = [
    h("section", { class: "cols" },
      h("div", {}, h("h2", {}, "Addresses"), addr),
      h("div", {}, h("h2", {}, "Proxies"), proxies)),
    h("h2", {}, "Applications"),
    table(["Name", "Status", "Message", "Route prefix / ingress", "Last deployed", "Replicas"],
      appRows, { id: "apps" }),
  ];
  for (const app of apps) {
    sections.push(h("section", { class: "app-charts", "data-app": app.name },
      h("h3", {}, link(appHref(app.name), app.name), " — calls over the last " +
        Math.round(ov.chart_window_s / 60) + " minutes"),
      await chartsFor(app.name, "", ov.now)));
  }
  root.replaceChildren(...sections);
}

function configTable(cfg) {
  const keys = ["num_replicas", "max_ongoing_requests", "max_queued_requests",
    "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s"];
  const rows = keys.filter((k) => k in cfg).map((k) => [k, String(cfg[k])]);
  rows.push(["model", cfg.import_path || (cfg.targets || []).join(", ")]);
  rows.push(["user_config", h("code", {}, JSON.stringify(cfg.user_config))]);
  return table(["Setting", "Value"], rows, { class: "config" });
}

function replicaTable(replicas, now) {
  return table(["Replica", "State", "PID", "Address", "Started", "Restarts", "In flight",
    "RSS", "RSS − shared", "Message"], replicas.map((r) => [
    r.external ? r.replica_id : link(replicaHref(r.replica_id), r.replica_id),
    badge(r.state), r.pid ? String(r.pid) : "-", h("code", {}, r.address || "-"),
    ago(r.start_time_s, now), String(r.restarts), String(r.in_flight), mb(r.rss_bytes),
    mb(r.rss_minus_shared_bytes), h("span", { class: "msg" }, r.message || "")]),
  { class: "replicas" });
}

async function application(root) {
  const name = document.body.dataset.app;
  const serve = await api("/api/serve/applications/");
  const app = serve.applications[name];
  if (!app) { root.replaceChildren(h("p", { class: "error" }, "This application is gone.")); return; }
  const now = Date.now() / 1000;
  const parts = [h("dl", { class: "facts" },
    h("dt", {}, "Status"), h("dd", {}, badge(app.status)),
    h("dt", {}, "Message"), h("dd", { class: "msg" }, app.message || "-"),
    h("dt", {}, "Ingress deployment"), h("dd", {}, app.ingress_deployment),
    h("dt", {}, "Route prefix"), h("dd", {}, app.route_prefix || "-"),
    h("dt", {}, "Last deployed"), h("dd", {}, when(app.last_deployed_time_s))),
  h("h2", {}, "Application calls"), await chartsFor(name, "", now)];
  for (const d of Object.values(app.deployments)) {
    parts.push(h("section", { class: "deployment", "data-deployment": d.name },
      h("h2", {}, "Deployment " + d.name + " "), badge(d.status),
      d.message ? h("p", { class: "msg" }, d.message) : null,
      h("div", { class: "cols" },
        h("div", {}, h("h3", {}, "Config"), configTable(d.deployment_config)),
        h("div", {}, h("h3", {}, "Now"), h("dl", { class: "facts" },
          h("dt", {}, "Target replicas"), h("dd", {}, String(d.target_num_replicas)),
          h("dt", {}, "Queued calls"), h("dd", {}, String(d.queued)),
          h("dt", {}, "Replica states"), h("dd", {}, replicaStates(d.replica_states))))),
      h("h3", {}, "Replicas"), replicaTable(d.replicas, now),
      h("h3", {}, "Calls"), await chartsFor(name, d.name, now)));
  }
  root.replaceChildren(...parts);
}

async function replicaMeta(box, id) {
  const r = await api("/api/gateway/replicas/" + encodeURIComponent(id));
  const now = Date.now() / 1000;
  const meta = h("dl", { class: "facts" },
    h("dt", {}, "Application"), h("dd", {}, link(appHref(r.application), r.application)),
    h("dt", {}, "Deployment"), h("dd", {}, r.deployment || "-"),
    h("dt", {}, "State"), h("dd", {}, badge(r.state)),
    h("dt", {}, "PID"), h("dd", {}, r.pid ? String(r.pid) : "-"),
    h("dt", {}, "Address"), h("dd", {}, h("code", {}, r.address || "-")),
    h("dt", {}, "Started"), h("dd", {}, when(r.start_time_s)),
    h("dt", {}, "Restarts"), h("dd", {}, r.restarts === undefined ? "-" : String(r.restarts)),
    h("dt", {}, "In flight"), h("dd", {}, r.in_flight === undefined ? "-" : String(r.in_flight)),
    h("dt", {}, "Memory"), h("dd", {}, "RSS " + mb(r.rss_bytes) + ", RSS − shared " +
      mb(r.rss_minus_shared_bytes)),
    h("dt", {}, "Log file"), h("dd", {}, h("code", {}, r.log_file_path || "-")),
    h("dt", {}, "Message"), h("dd", { class: "msg" }, r.message || "-"));
  const events = table(["When", "Event", "State", "Detail"], [...r.events].reverse().map((e) =>
    [ago(e.t, now), e.event, e.state ? badge(e.state) : "", h("span", { class: "msg" }, e.message)]),
  { class: "events" });
  box.replaceChildren(h("div", { class: "cols" },
    h("div", {}, h("h2", {}, "Metadata"), meta),
    h("div", {}, h("h2", {}, "Recent health checks and state changes"), events)));
}

// A log view: tail, then follow by byte offset; level filter and search re-read the tail.
function logView(container, source) {
  const level = h("select", { id: "log-level" }, ["", "DEBUG", "INFO", "WARNING", "ERROR"]
    .map((l) => h("option", { value: l }, l ? l + " and above" : "all levels")));
  const search = h("input", { id: "log-search", type: "search", placeholder: "request id or text" });
  const follow = h("input", { id: "log-follow", type: "checkbox", checked: "checked" });
  const count = h("span", { id: "log-count", class: "muted" });
  const note = h("p", { id: "log-truncated", class: "muted", hidden: "hidden" },
    "Only the newest part of the log is shown. ");
  const older = h("button", { id: "log-older", type: "button" }, "Show older lines");
  note.appendChild(older);
  const lines = h("div", { id: "log-lines", class: "log", role: "log" });
  container.replaceChildren(h("div", { class: "logbar" },
    h("label", {}, "Level ", level), h("label", {}, "Search ", search),
    h("label", {}, follow, " follow"), count), note, lines);
  let offset = null;
  let start = 0;
  const truncated = (data) => {
    start = data.start || 0;
    note.hidden = !data.truncated;
  };
  let gen = 0;
  const query = () => source + "&level=" + encodeURIComponent(level.value) + "&q=" +
    encodeURIComponent(search.value.trim());
  const add = (entries) => {
    const stick = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 30;
    const frag = document.createDocumentFragment();
    for (const e of entries) {
      frag.appendChild(h("div", { class: "ln " + (e.level || "raw").toLowerCase() }, e.line));
    }
    lines.appendChild(frag);
    while (lines.childElementCount > MAX_LOG_LINES) lines.firstChild.remove();
    count.textContent = lines.childElementCount + " lines";
    if (follow.checked && stick) lines.scrollTop = lines.scrollHeight;
  };
  const reload = async () => {
    const mine = ++gen;
    const data = await api(query() + "&limit=" + MAX_LOG_LINES);
    if (mine !== gen) return;
    lines.replaceChildren();
    offset = data.offset;
    truncated(data);
    if (!data.exists) count.textContent = "no log file yet";
    add(data.entries);
    lines.scrollTop = lines.scrollHeight;
  };
  // The window before the oldest one shown (the API reads a bounded window per request).
  const loadOlder = async () => {
    if (start <= 0) return;
    const mine = gen;
    const data = await api(query() + "&before=" + start + "&limit=" + MAX_LOG_LINES);
    if (mine !== gen) return;
    truncated(data);
    const frag = document.createDocumentFragment();
    for (const e of data.entries) {
      frag.appendChild(h("div", { class: "ln " + (e.level || "raw").toLowerCase() }, e.line));
    }
    lines.insertBefore(frag, lines.firstChild);
    while (lines.childElementCount > MAX_LOG_LINES) lines.lastChild.remove();
    count.textContent = lines.childElementCount + " lines";
  };
  older.addEventListener("click", () => loadOlder().catch(showError));
  const poll = async () => {
    if (!follow.checked || offset === null) return;
    const mine = gen;
    const data = await api(query() + "&after=" + offset + "&limit=" + MAX_LOG_LINES);
    if (mine !== gen) return;
    offset = data.offset;
    add(data.entries);
  };
  level.addEventListener("change", () => reload().catch(showError));
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => reload().catch(showError), SEARCH_DEBOUNCE_MS);
  });
  reload().catch(showError);
  setInterval(() => poll().then(tick).catch(showError), LOG_POLL_MS);
}

function replicaPage(root) {
  const id = document.body.dataset.replica;
  const meta = h("div", { id: "meta" });
  const logBox = h("section", { id: "log" });
  root.replaceChildren(meta, h("h2", {}, "Log"), logBox);
  every(REFRESH_MS, () => replicaMeta(meta, id));
  logView(logBox, "/api/gateway/logs?replica=" + encodeURIComponent(id));
}

function gatewayLog(root) {
  const box = h("section", { id: "log" });
  root.replaceChildren(h("p", { class: "muted" }, "The gateway's own log: controller, proxy " +
    "and access lines, and output replicas wrote outside their logging."), box);
  logView(box, "/api/gateway/logs?component=gateway");
}

async function processes(root) {
  const data = await api("/api/gateway/processes");
  root.replaceChildren(table(["Kind", "Name", "PID", "Alive", "Exit code", "Started", "Died",
    "RSS", "RSS − shared", "Log"], data.processes.map((p) => [
    p.kind, p.kind === "replica" ? link(replicaHref(p.name), p.name) : p.name, String(p.pid),
    p.alive ? badge("ALIVE") : badge("DEAD"), p.exit_code === null ? "-" : String(p.exit_code),
    ago(p.started_at, data.now), p.died_at ? ago(p.died_at, data.now) : "-",
    mb(p.rss_bytes), mb(p.rss_minus_shared_bytes),
    link(p.kind === "replica" ? replicaHref(p.name) + "#log" : "/logs/gateway", "log")]),
  { id: "processes" }));
}

async function records(root) {
  const data = await api("/api/gateway/records");
  const exps = Object.entries(data.exporters || {});
  const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
  const parts = [h("dl", { class: "facts" },
    h("dt", {}, "Calls sampled"), h("dd", {}, String(data.calls_sampled ?? 0)),
    h("dt", {}, "Records built"), h("dd", {}, String(data.records_built ?? 0)),
    h("dt", {}, "Waiting to decode"), h("dd", {}, String(data.intake_depth ?? 0)),
    h("dt", {}, "Calls dropped"), h("dd", {}, String(sum(data.calls_dropped)))),
  h("h2", {}, "Exporters"),
  table(["Exporter", "Exported", "Failed", "Retries", "Dropped", "Queue", "Last error"],
    exps.map(([name, e]) => [name, String(e.exported), String(e.failed), String(e.retries),
      String(sum(e.dropped)) + (sum(e.dropped) ? " (" + Object.entries(e.dropped)
        .filter(([, v]) => v).map(([k, v]) => k + " " + v).join(", ") + ")" : ""),
      String(e.queue_depth), h("span", { class: "msg" }, e.last_error ?
        e.last_error + " (" + ago(e.last_error_at) + ")" : "-")]), { id: "exporters" })];
  for (const [name, e] of exps) {
    parts.push(h("h3", {}, "Last records sent by " + name));
    parts.push((e.recent || []).length ? h("div", { class: "log records" },
      e.recent.map((r) => h("div", { class: "ln" }, JSON.stringify(r))))
      : h("p", { class: "muted" }, "none yet"));
  }
  root.replaceChildren(...parts);
}

// -- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("root");
  const page = document.body.dataset.page;
  if (page === "overview") every(REFRESH_MS, () => overview(root));
  else if (page === "application") every(REFRESH_MS, () => application(root));
  else if (page === "replica") replicaPage(root);
  else if (page === "log") gatewayLog(root);
  else if (page === "processes") every(REFRESH_MS, () => processes(root));
  else if (page === "records") every(REFRESH_MS, () => records(root));
  else if (page === "missing") root.replaceChildren(link("/", "Back to the overview"));
});
