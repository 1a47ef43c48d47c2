// The operations console (admins). It reads what an operator's tools read:
// /metrics (Prometheus text), /readyz, and the admin API (jobs, dead events).
// Rates and p99 are computed from two scrapes of the histograms, WINDOW_MS
// apart, as Prometheus's rate() and histogram_quantile() would: the figures are
// those of the process that answered (in a split deployment, one instance).
import { api, ApiError, session, signInForm, el, show, when, notice, accountNav } from "/assets/api.js";

const main = document.getElementById("main");
const REFRESH_MS = 2000;
const WINDOW_MS = 30000;

/** Prometheus text format → [{name, labels, value}]. */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function pick(samples, name) {
  return samples.filter((s) => s.name === name);
}

/** Sums `name`'s samples by the labels `by` → Map(key → {labels, value}). */
function sumBy(samples, name, by) {
  const out = new Map();
  for (const s of pick(samples, name)) {
    const key = by.map((b) => s.labels[b] ?? "").join("\u0000");
    const cur = out.get(key) || { labels: Object.fromEntries(by.map((b) => [b, s.labels[b] ?? ""])), value: 0 };
    cur.value += s.value;
    out.set(key, cur);
  }
  return out;
}

/** histogram_quantile over cumulative bucket counts [{le, count}]. */
function quantile(q, buckets) {
  const sorted = [...buckets].sort((a, b) => a.le - b.le);
  const total = sorted.length ? sorted[sorted.length - 1].count : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of sorted) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      const inBucket = b.count - prevCount;
      return inBucket > 0 ? prevLe + ((b.le - prevLe) * (rank - prevCount)) / inBucket : b.le;
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

// ---- the traffic table -------------------------------------------------------

/** Per route (method and template): total count, 5xx count, buckets by le. */
function routeStats(samples) {
  const routes = new Map();
  const key = (l) => `${l.method} ${l.route}`;
  const get = (l) => {
    const k = key(l);
    if (!routes.has(k)) routes.set(k, { method: l.method, route: l.route, count: 0, errors: 0, buckets: new Map() });
    return routes.get(k);
  };
  for (const s of pick(samples, "http_request_duration_seconds_count")) {
    const r = get(s.labels);
    r.count += s.value;
    if (String(s.labels.status).startsWith("5")) r.errors += s.value;
  }
  for (const s of pick(samples, "http_request_duration_seconds_bucket")) {
    const r = get(s.labels);
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    r.buckets.set(le, (r.buckets.get(le) || 0) + s.value);
  }
  return routes;
}

function trafficRows(now, then, seconds) {
  const rows = [];
  for (const [k, r] of now) {
    const old = then.get(k) || { count: 0, errors: 0, buckets: new Map() };
    const n = r.count - old.count;
    if (n <= 0) continue;
    const buckets = [...r.buckets].map(([le, c]) => ({ le, count: c - (old.buckets.get(le) || 0) }));
    rows.push({ method: r.method, route: r.route, rate: n / seconds, errors: (r.errors - old.errors) / n, p99: quantile(0.99, buckets), total: r.count });
  }
  return rows.sort((a, b) => b.rate - a.rate);
}

// ---- rendering helpers --------------------------------------------------------

function table(caption, head, rows, empty = "Nothing to show.") {
  if (rows.length === 0) return el("p", { class: "muted" }, empty);
  return el("div", { class: "table-wrap" }, el("table", {}, el("caption", { class: "visually-hidden" }, caption),
    el("thead", {}, el("tr", {}, head.map(([h, num]) => el("th", { scope: "col", class: num ? "num" : "" }, h)))),
    el("tbody", {}, rows)));
}

const td = (v, num = false) => el("td", { class: num ? "num" : "" }, v);
const fmt = (x, digits = 1) => (x === null || x === undefined || Number.isNaN(x) ? "—" : x.toFixed(digits));
const pct = (x) => (x === null || Number.isNaN(x) ? "—" : `${(x * 100).toFixed(1)} %`);

function tile(id, heading, ...body) {
  return el("section", { class: "tile", id, "aria-labelledby": `${id}-h` }, el("h2", { id: `${id}-h` }, heading), ...body);
}

// ---- the console ---------------------------------------------------------------

const history = []; // [{at, routes, cache}] scrapes within the window
let timer = null;

async function start() {
  accountNav(() => location.assign("/console"));
  if (!session()) {
    document.title = "Sign in · scaleshop console";
    show(main, el("h1", {}, "Operations console"), el("p", {}, "Sign in with an admin account."),
      signInForm(() => start(), "/console"));
    return;
  }
  let me;
  try {
    me = await api("GET", "/v1/me");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return start();
    show(main, el("h1", {}, "Operations console"), notice(e.message, "error"));
    return;
  }
  if (me.role !== "admin") {
    show(main, el("h1", {}, "Operations console"), notice("This console is for admins. You are signed in as a customer.", "error"));
    return;
  }
  document.title = "scaleshop console";
  const parts = {
    traffic: el("div"), cache: el("div"), jobs: el("div"), dead: el("div"), events: el("div"), messaging: el("div"), database: el("div"),
  };
  const updated = el("p", { class: "muted", id: "updated" }, "Loading…");
  show(main, el("div", { class: "row" }, el("h1", {}, "Operations console"), updated),
    tile("traffic", "Traffic per route (last 30 s)", parts.traffic),
    el("div", { class: "tiles" },
      tile("cache", "Cache hit ratio", parts.cache),
      tile("messaging", "Consumers and outbox", parts.messaging),
      tile("database", "Database topology", parts.database)),
    tile("jobs", "Job queues", parts.jobs),
    tile("dead-jobs", "Dead and failed jobs", parts.dead),
    tile("dead-events", "Dead events", parts.events));
  main.focus();
  const tick = async () => {
    if (!document.hidden) {
      try {
        await refresh(parts);
        updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) return start();
        updated.textContent = `Not updated: ${e.message}`;
      }
    }
    timer = setTimeout(tick, REFRESH_MS);
  };
  clearTimeout(timer);
  await tick();
}

async function refresh(parts) {
  const [text, ready, dead, failed, deadEvents] = await Promise.all([
    fetch("/metrics", { credentials: "omit" }).then((r) => r.text()),
    fetch("/readyz", { credentials: "omit" }).then((r) => r.json()),
    api("GET", "/v1/jobs?state=dead&limit=50"),
    api("GET", "/v1/jobs?state=failed&limit=50"),
    api("GET", "/v1/events/dead?limit=50"),
  ]);
  const samples = parseMetrics(text);
  const at = performance.now();
  history.push({ at, routes: routeStats(samples) });
  while (history.length > 2 && at - history[1].at >= WINDOW_MS) history.shift();
  renderTraffic(parts.traffic);
  renderCache(parts.cache, samples);
  renderJobs(parts.jobs, samples);
  renderDeadJobs(parts.dead, [...dead.items, ...failed.items], parts);
  renderDeadEvents(parts.events, deadEvents.items, parts);
  renderMessaging(parts.messaging, samples);
  renderDatabase(parts.database, samples, ready);
}

function renderTraffic(node) {
  if (history.length < 2) {
    show(node, el("p", { class: "muted" }, "Measuring…"));
    return;
  }
  const first = history[0];
  const last = history[history.length - 1];
  const rows = trafficRows(last.routes, first.routes, (last.at - first.at) / 1000);
  show(node, table("Traffic per route", [["Method"], ["Route"], ["Requests/s", true], ["5xx", true], ["p99 (ms)", true], ["Total", true]],
    rows.map((r) => el("tr", {}, td(r.method), td(r.route), td(fmt(r.rate, 2), true), td(pct(r.errors), true),
      td(r.p99 === null ? "—" : fmt(r.p99 * 1000, 1), true), td(String(r.total), true))), "No requests in the window."));
}

function renderCache(node, samples) {
  const by = sumBy(samples, "cache_requests_total", ["cache", "tier", "result"]);
  const rows = new Map();
  for (const { labels, value } of by.values()) {
    const k = `${labels.cache} ${labels.tier}`;
    const r = rows.get(k) || { cache: labels.cache, tier: labels.tier, hit: 0, miss: 0 };
    r[labels.result === "hit" ? "hit" : "miss"] += value;
    rows.set(k, r);
  }
  show(node, table("Cache hit ratio per tier", [["Cache"], ["Tier"], ["Hits", true], ["Misses", true], ["Hit ratio", true]],
    [...rows.values()].sort((a, b) => `${a.cache}${a.tier}`.localeCompare(`${b.cache}${b.tier}`)).map((r) => el("tr", {},
      td(r.cache), td(r.tier), td(String(r.hit), true), td(String(r.miss), true), td(pct(r.hit + r.miss ? r.hit / (r.hit + r.miss) : null), true))),
    "No cache reads yet."));
}

function renderJobs(node, samples) {
  const states = ["scheduled", "running", "failed", "dead", "completed"];
  const queues = new Map();
  for (const s of pick(samples, "jobs")) {
    const q = queues.get(s.labels.queue) || {};
    q[s.labels.state] = (q[s.labels.state] || 0) + s.value;
    queues.set(s.labels.queue, q);
  }
  const runs = sumBy(samples, "job_runs_total", ["queue", "outcome"]);
  show(node, table("Job queues", [["Queue"], ...states.map((s) => [s, true]), ["Runs completed", true], ["Runs retried", true]],
    [...queues].sort().map(([queue, q]) => el("tr", {}, td(queue), states.map((s) => td(String(q[s] || 0), true)),
      td(String(runs.get(`${queue}\u0000completed`)?.value || 0), true), td(String(runs.get(`${queue}\u0000retried`)?.value || 0), true))),
    "No job queue in this process."));
}

function renderDeadJobs(node, jobs, parts) {
  show(node, table("Dead and failed jobs", [["Job"], ["Queue"], ["State"], ["Attempts", true], ["Last error"], ["Updated"], ["Action"]],
    jobs.map((j) => {
      const retry = el("button", { type: "button", "aria-label": `Retry job ${j.id}`, "data-job": j.id, class: "retry" }, "Retry");
      retry.addEventListener("click", async () => {
        retry.disabled = true;
        try {
          await api("POST", `/v1/jobs/${j.id}/retry`);
          await refresh(parts);
        } catch (e) {
          retry.replaceWith(notice(e.message, "error"));
        }
      });
      return el("tr", { "data-job": j.id }, td(j.id.slice(-12)), td(j.queue), td(el("span", { class: `badge ${j.state}` }, j.state)),
        td(`${j.attempts}/${j.max_attempts}`, true), td(j.last_error || ""), td(when(j.updated_at)), td(retry));
    }), "No dead or failed job."));
}

function renderDeadEvents(node, events, parts) {
  show(node, table("Dead events", [["Consumer"], ["Event"], ["Sequence", true], ["Attempts", true], ["Last error"], ["State"], ["Action"]],
    events.map((d) => {
      const again = el("button", { type: "button", disabled: d.state !== "dead", "aria-label": `Redeliver event ${d.event_id} to ${d.consumer}` }, "Redeliver");
      again.addEventListener("click", async () => {
        again.disabled = true;
        try {
          await api("POST", `/v1/events/dead/${encodeURIComponent(d.consumer)}/${d.event_id}/redeliver`);
          await refresh(parts);
        } catch (e) {
          again.replaceWith(notice(e.message, "error"));
        }
      });
      return el("tr", {}, td(d.consumer), td(d.event_id.slice(-12)), td(String(d.sequence), true), td(String(d.attempts), true),
        td(d.last_error), td(el("span", { class: `badge ${d.state}` }, d.state)), td(again));
    }), "No dead event."));
}

function renderMessaging(node, samples) {
  const value = (name) => pick(samples, name).reduce((sum, s) => sum + s.value, 0);
  const present = (name) => pick(samples, name).length > 0;
  const lags = pick(samples, "event_consumer_lag").sort((a, b) => a.labels.consumer.localeCompare(b.labels.consumer));
  const projections = pick(samples, "projection_lag");
  show(node,
    el("p", {}, "Outbox backlog: ", el("span", { class: "big", id: "outbox-backlog" }, present("outbox_backlog") ? String(value("outbox_backlog")) : "—"),
      present("relay_backlog") ? el("span", {}, " · relay backlog ", String(value("relay_backlog"))) : null),
    table("Consumer lag", [["Consumer"], ["Events behind", true]],
      lags.map((s) => el("tr", {}, td(s.labels.consumer), td(String(s.value), true))), "No consumer in this process."),
    projections.length ? table("Projection lag", [["Projection"], ["Events behind", true]],
      projections.map((s) => el("tr", {}, td(s.labels.projection), td(String(s.value), true)))) : null);
}

function renderDatabase(node, samples, ready) {
  const c = ready.components || {};
  const pools = sumBy(samples, "db_pool_connections", ["pool", "state"]);
  const poolRows = new Map();
  for (const { labels, value } of pools.values()) {
    const r = poolRows.get(labels.pool) || { idle: 0, in_use: 0 };
    r[labels.state] = value;
    poolRows.set(labels.pool, r);
  }
  const lag = new Map(pick(samples, "db_replica_lag_seconds").map((s) => [s.labels.replica, s.value]));
  const replicas = Object.entries(ready.replicas || {});
  const badge = (state) => el("span", { class: `badge ${state}` }, state === "disabled" ? "not configured" : state);
  show(node,
    table("Components", [["Component"], ["State"]],
      Object.entries(c).map(([name, state]) => el("tr", {}, td(name), td(badge(state))))),
    el("h3", {}, "Primary pools"),
    table("Pools", [["Pool"], ["In use", true], ["Idle", true]],
      [...poolRows].sort().map(([pool, r]) => el("tr", {}, td(pool), td(String(r.in_use), true), td(String(r.idle), true)))),
    el("h3", {}, "Read replicas"),
    table("Read replicas", [["Replica"], ["State"], ["Lag (s)", true]],
      replicas.map(([name, state]) => el("tr", {}, td(name), td(badge(state)), td(lag.has(name) ? fmt(lag.get(name), 3) : "—", true))),
      c.replicas === "disabled" || !c.replicas ? "No read replica configured." : "No replica listed."),
    el("h3", {}, "Shards"),
    el("p", { class: "muted" }, c.shards && c.shards !== "disabled" ? `Shards: ${c.shards}` : "No shards configured: every user is on the primary."));
}

start();
