// The public API as the storefront and the console call it, and the small DOM
// helpers both use. Pages are built with DOM calls and textContent only: data
// never goes through an HTML parser.

const SESSION_KEY = "scaleshop.session";
const TOKEN_KEY = "scaleshop.consistency";
const TIMEOUT_MS = 15000;

/** The signed-in session ({token, user_id, expires_at, email}), or null. */
export function session() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
    if (s && s.token && new Date(s.expires_at) > new Date()) return s;
  } catch (_) { /* a damaged entry is no session */ }
  return null;
}

export function clearSession() {
  localStorage.removeItem(SESSION_KEY);
}

/** An answer that was not 2xx: its status and its problem document. */
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `the server answered ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
  /** The message for one field of a 422, if any. */
  field(name) {
    const e = (this.problem.errors || []).find((x) => x.field === name);
    return e ? e.message : null;
  }
}

/**
 * Calls the API. Sends the bearer token when signed in, and on reads the
 * consistency token of the last write (so a read sees that write). Bounded by a
 * timeout. Resolves to the JSON body (null for 204); rejects with ApiError.
 */
export async function api(method, path, { body, headers = {}, auth = true } = {}) {
  const h = { Accept: "application/json", ...headers };
  const s = session();
  if (auth && s) h.Authorization = `Bearer ${s.token}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const written = sessionStorage.getItem(TOKEN_KEY);
  if (method === "GET" && written) h["X-Consistency-Token"] = written;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal,
      credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, { detail: controller.signal.aborted ? "the server did not answer in time" : "the server cannot be reached" });
  } finally {
    clearTimeout(timer);
  }
  const token = res.headers.get("X-Consistency-Token");
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  if (res.status === 204) return null;
  const type = res.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await res.json() : await res.text();
  if (!res.ok) {
    if (res.status === 401 && auth && s) clearSession();
    throw new ApiError(res.status, typeof data === "object" ? data : null);
  }
  return data;
}

/** Signs in; keeps the session. */
export async function signIn(email, password) {
  const s = await api("POST", "/v1/sessions", { body: { email, password }, auth: false });
  localStorage.setItem(SESSION_KEY, JSON.stringify({ ...s, email: email.trim().toLowerCase() }));
  return s;
}

/** Signs out here and on the server (the token is refused from then on). */
export async function signOut() {
  try {
    if (session()) await api("DELETE", "/v1/sessions/current");
  } catch (_) { /* the session ends here whatever the server said */ }
  clearSession();
}

/** An element: el("a", {href: "/"}, "text", child, ...). Strings become text. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Replaces the children of `node`. */
export function show(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

/** An amount in minor units, formatted in its currency. */
export function money(cents, currency) {
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(cents / 100);
  } catch (_) {
    return `${(cents / 100).toFixed(2)} ${currency}`;
  }
}

export function when(ts) {
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
}

/** A notice box; role=alert for errors so screen readers announce them. */
export function notice(text, kind = "") {
  return el("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** A form field: label, input, and a slot for its error. */
export function field(id, label, attrs = {}) {
  const error = el("p", { class: "error", id: `${id}-error`, hidden: true });
  const input = el("input", { id, name: id, "aria-describedby": `${id}-error`, ...attrs });
  return { node: el("div", { class: "field" }, el("label", { for: id }, label), input, error), input, error };
}

/** Shows each field's message of a 422 next to it; returns whether any matched. */
export function fieldErrors(err, fields) {
  let any = false;
  for (const [name, f] of Object.entries(fields)) {
    const msg = err instanceof ApiError ? err.field(name) : null;
    f.error.hidden = !msg;
    f.error.textContent = msg || "";
    f.input.setAttribute("aria-invalid", msg ? "true" : "false");
    any ||= Boolean(msg);
  }
  return any;
}

/**
 * The sign-in form; `done` runs after a successful sign-in. `after` is where the
 * sign-up link returns to.
 */
export function signInForm(done, after = "/") {
  const email = field("email", "Email", { type: "email", autocomplete: "username", required: true });
  const password = field("password", "Password", { type: "password", autocomplete: "current-password", required: true });
  const status = el("div", { "aria-live": "polite" });
  const submit = el("button", { type: "submit" }, "Sign in");
  const form = el("form", { class: "narrow", novalidate: true }, email.node, password.node, status, submit,
    el("p", {}, "No account yet? ", el("a", { href: `/signup?next=${encodeURIComponent(after)}` }, "Sign up")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    show(status);
    try {
      await signIn(email.input.value, password.input.value);
      await done();
    } catch (e) {
      show(status, notice(e.status === 401 ? "Wrong email or password." : e.message, "error"));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

/** A path from `?next=`, only if it is one of ours (no open redirect). */
export function nextPath(fallback = "/") {
  const next = new URLSearchParams(location.search).get("next") || "";
  return next.startsWith("/") && !next.startsWith("//") && !next.includes("\\") ? next : fallback;
}

/** The account item of the navigation bar. */
export function accountNav(onSignOut) {
  const slot = document.getElementById("nav-account");
  if (!slot) return;
  const s = session();
  if (!s) {
    const here = encodeURIComponent(location.pathname + location.search);
    show(slot, el("a", { href: `/signin?next=${here}` }, "Sign in"), " · ", el("a", { href: `/signup?next=${here}` }, "Sign up"));
    return;
  }
  show(slot, el("span", { class: "who" }, s.email || "signed in"), " · ",
    el("button", { type: "button", class: "link", onclick: async () => { await signOut(); onSignOut(); } }, "Sign out"));
}
