// The storefront: one script for every storefront path (the server sends the
// same document for each). The cart lives in this browser (localStorage); an
// order is created with an Idempotency-Key kept with the cart, so a double click,
// a retry or a reload during checkout makes one order.
import {
  api, ApiError, session, signInForm, signIn, el, show, money, when, notice, field,
  fieldErrors, nextPath, accountNav,
} from "/assets/api.js";

const main = document.getElementById("main");
const PAGE = 12;
const POLL_MS = 500;

const METHODS = [
  ["pm_card_visa", "Visa (test card, succeeds)"],
  ["pm_card_mastercard", "Mastercard (test card, succeeds)"],
  ["pm_card_chargeDeclined", "Test card that is declined"],
  ["pm_card_processingError", "Test card with a processing error"],
];
const REASONS = {
  out_of_stock: "Some items were out of stock.",
  payment_declined: "Your card was declined.",
  payment_error: "The payment provider failed; nothing was charged.",
};

// ---- the cart ---------------------------------------------------------------

const CART_KEY = "scaleshop.cart";

function cart() {
  try {
    const c = JSON.parse(localStorage.getItem(CART_KEY) || "null");
    if (c && Array.isArray(c.lines)) return c;
  } catch (_) { /* a damaged cart is an empty one */ }
  return { lines: [], key: null };
}

/** Saves the cart. A change of its lines is a new checkout: a new key. */
function saveCart(c, linesChanged = true) {
  if (linesChanged) c.key = null;
  localStorage.setItem(CART_KEY, JSON.stringify(c));
  updateCount();
}

function addToCart(product, quantity) {
  const c = cart();
  const line = c.lines.find((l) => l.product_id === product.id);
  if (line) line.quantity = Math.min(1000, line.quantity + quantity);
  else c.lines.push({ product_id: product.id, quantity, name: product.name, price_cents: product.price_cents, currency: product.currency });
  saveCart(c);
}

function updateCount() {
  const n = cart().lines.reduce((sum, l) => sum + l.quantity, 0);
  const count = document.getElementById("cart-count");
  if (count) count.textContent = String(n);
}

// ---- pages ------------------------------------------------------------------

const ROUTES = [
  [/^\/$/, home],
  [/^\/products\/([^/]+)$/, productPage],
  [/^\/cart$/, cartPage],
  [/^\/signin$/, signInPage],
  [/^\/signup$/, signUpPage],
  [/^\/orders$/, ordersPage],
  [/^\/orders\/([^/]+)$/, orderPage],
];

async function route() {
  accountNav(() => location.assign("/"));
  updateCount();
  for (const [pattern, page] of ROUTES) {
    const m = location.pathname.match(pattern);
    if (m) {
      try {
        await page(...m.slice(1).map(decodeURIComponent));
      } catch (e) {
        show(main, el("h1", {}, "Something went wrong"), notice(e.message, "error"));
      }
      return;
    }
  }
  show(main, el("h1", {}, "Not found"), el("p", {}, el("a", { href: "/" }, "Back to the shop")));
}

function title(text) {
  document.title = `${text} · scaleshop`;
  return el("h1", {}, text);
}

/** Sends a signed-out visitor to sign in, then back here. */
function needSignIn() {
  if (session()) return false;
  location.assign(`/signin?next=${encodeURIComponent(location.pathname + location.search)}`);
  return true;
}

function thumbnail(product) {
  const image = (product.images || []).find((i) => i.status === "ready" && i.variants.length);
  if (!image) return el("div", { class: "placeholder", "aria-hidden": "true" }, "no image");
  const thumb = image.variants.find((v) => v.name === "thumb") || image.variants[0];
  return el("img", { class: "thumb", src: thumb.url, alt: product.name, width: thumb.width, height: thumb.height, loading: "lazy" });
}

function availability(product) {
  return product.available > 0
    ? el("span", { class: "muted" }, `In stock (${product.available})`)
    : el("span", { class: "badge failed" }, "Out of stock");
}

async function home() {
  const params = new URLSearchParams(location.search);
  const q = (params.get("q") || "").trim();
  const search = field("q", "Search products", { type: "search", value: q, autocomplete: "off", placeholder: "name, sku or description" });
  const form = el("form", { role: "search", class: "search", action: "/", method: "get" }, search.node, el("button", { type: "submit" }, "Search"));
  const status = el("p", { class: "visually-hidden", role: "status", id: "cart-status" });
  const list = el("ul", { class: "grid", id: "products", "aria-label": "Products" });
  const more = el("button", { type: "button", class: "secondary", hidden: true }, "More products");
  const summary = el("p", { class: "muted", role: "status" });
  show(main, title(q ? `Results for “${q}”` : "Products"), form, summary, status, list, el("p", {}, more));
  let cursor = null;
  let shown = 0;
  async function load() {
    more.disabled = true;
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (q) query.set("q", q);
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/v1/products?${query}`, { auth: false });
    for (const p of page.items) {
      const add = el("button", { type: "button", disabled: p.available <= 0, "aria-label": `Add ${p.name} to cart`, "data-product": p.id }, "Add to cart");
      add.addEventListener("click", () => {
        addToCart(p, 1);
        status.textContent = `Added ${p.name} to the cart.`;
      });
      list.append(el("li", { class: "card" }, thumbnail(p),
        el("h2", {}, el("a", { href: `/products/${p.id}` }, p.name)),
        el("span", { class: "price" }, money(p.price_cents, p.currency)), availability(p),
        el("div", { class: "actions" }, add)));
    }
    shown += page.items.length;
    summary.textContent = shown === 0 ? (q ? "No product matches." : "No products yet.") : `${shown} product${shown === 1 ? "" : "s"} shown.`;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    more.disabled = false;
  }
  more.addEventListener("click", () => load().catch((e) => summary.replaceWith(notice(e.message, "error"))));
  await load();
}

async function productPage(id) {
  let p;
  try {
    p = await api("GET", `/v1/products/${encodeURIComponent(id)}`, { auth: false });
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      show(main, title("No such product"), el("p", {}, el("a", { href: "/" }, "Back to the shop")));
      return;
    }
    throw e;
  }
  const ready = (p.images || []).filter((i) => i.status === "ready" && i.variants.length);
  const gallery = ready.length
    ? el("div", { class: "gallery" }, ready.map((image) => {
      const medium = image.variants.find((v) => v.name === "medium") || image.variants[image.variants.length - 1];
      const srcset = image.variants.map((v) => `${v.url} ${v.width}w`).join(", ");
      return el("img", { src: medium.url, srcset, sizes: "(max-width: 700px) 100vw, 50vw", width: medium.width, height: medium.height, alt: p.name });
    }))
    : el("div", { class: "placeholder", "aria-hidden": "true" }, "no image");
  const qty = field("quantity", "Quantity", { type: "number", min: 1, max: 1000, value: 1, inputmode: "numeric" });
  const status = el("div", { "aria-live": "polite" });
  const add = el("button", { type: "submit", disabled: p.available <= 0 }, "Add to cart");
  const form = el("form", { class: "narrow" }, qty.node, add, status);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const n = Number.parseInt(qty.input.value, 10);
    if (!(n >= 1 && n <= 1000)) {
      qty.error.hidden = false;
      qty.error.textContent = "Choose a quantity from 1 to 1000.";
      return;
    }
    qty.error.hidden = true;
    addToCart(p, n);
    show(status, notice(`Added ${n} × ${p.name} to the cart.`, "ok"), el("a", { href: "/cart" }, "Go to the cart"));
  });
  show(main, el("p", {}, el("a", { href: "/" }, "← All products")),
    el("div", { class: "product" }, gallery, el("div", {}, title(p.name),
      el("p", { class: "price big" }, money(p.price_cents, p.currency)), availability(p),
      el("p", {}, p.description || ""), el("p", { class: "muted" }, `SKU ${p.sku}`), form)));
}

async function cartPage() {
  const c = cart();
  const status = el("div", { "aria-live": "polite", id: "checkout-status" });
  if (c.lines.length === 0) {
    show(main, title("Your cart"), el("p", {}, "The cart is empty. ", el("a", { href: "/" }, "Find something")), status);
    return;
  }
  const body = el("tbody");
  const totals = el("p", { class: "big", id: "cart-total" });
  function renderTotals() {
    const byCurrency = {};
    for (const l of cart().lines) byCurrency[l.currency] = (byCurrency[l.currency] || 0) + l.price_cents * l.quantity;
    totals.textContent = `Total: ${Object.entries(byCurrency).map(([cur, cents]) => money(cents, cur)).join(" + ")}`;
  }
  for (const line of c.lines) {
    const qid = `qty-${line.product_id}`;
    const qty = el("input", { id: qid, type: "number", min: 1, max: 1000, value: line.quantity, inputmode: "numeric" });
    qty.addEventListener("change", () => {
      const n = Math.max(1, Math.min(1000, Number.parseInt(qty.value, 10) || 1));
      qty.value = String(n);
      const now = cart();
      const l = now.lines.find((x) => x.product_id === line.product_id);
      if (l) l.quantity = n;
      saveCart(now);
      renderTotals();
    });
    const remove = el("button", { type: "button", class: "secondary", "aria-label": `Remove ${line.name}` }, "Remove");
    remove.addEventListener("click", () => {
      const now = cart();
      now.lines = now.lines.filter((x) => x.product_id !== line.product_id);
      saveCart(now);
      cartPage();
    });
    body.append(el("tr", {},
      el("td", {}, el("a", { href: `/products/${line.product_id}` }, line.name)),
      el("td", { class: "num" }, money(line.price_cents, line.currency)),
      el("td", {}, el("label", { for: qid, class: "visually-hidden" }, `Quantity of ${line.name}`), qty),
      el("td", {}, remove)));
  }
  renderTotals();
  const table = el("div", { class: "table-wrap" }, el("table", { class: "cart-lines" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Product"), el("th", { scope: "col", class: "num" }, "Price"),
      el("th", { scope: "col" }, "Quantity"), el("th", { scope: "col" }, el("span", { class: "visually-hidden" }, "Actions")))), body));
  const method = el("select", { id: "payment-method", name: "payment_method" }, METHODS.map(([v, label]) => el("option", { value: v }, label)));
  const checkout = el("button", { type: "submit", id: "checkout" }, "Place order");
  const form = el("form", { class: "narrow" },
    el("div", { class: "field" }, el("label", { for: "payment-method" }, "Payment method"), method), checkout, status);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    placeOrder(method.value, checkout, status);
  });
  const signedIn = session();
  show(main, title("Your cart"), table, totals,
    signedIn ? form : el("p", {}, el("a", { href: "/signin?next=/cart", class: "button" }, "Sign in to check out")));
}

let placing = false;

/**
 * Creates the order once: the button is disabled at once, and the request
 * carries the cart's Idempotency-Key, so whatever is sent twice (a double click,
 * a retry after a lost answer, a reload) answers the one order.
 */
async function placeOrder(paymentMethod, button, status) {
  if (placing) return;
  placing = true;
  button.disabled = true;
  show(status, notice("Placing the order…"));
  const c = cart();
  if (!c.key) {
    c.key = crypto.randomUUID();
    saveCart(c, false);
  }
  const body = { items: c.lines.map((l) => ({ product_id: l.product_id, quantity: l.quantity })), payment_method: paymentMethod };
  try {
    let order = null;
    for (let attempt = 0; attempt < 20 && !order; attempt++) {
      try {
        order = await api("POST", "/v1/orders", { body, headers: { "Idempotency-Key": c.key } });
      } catch (e) {
        // 409: the same key is still being answered (an earlier try): ask again.
        if (!(e instanceof ApiError && e.status === 409) || attempt === 19) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    localStorage.removeItem(CART_KEY);
    updateCount();
    location.assign(`/orders/${order.id}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      location.assign("/signin?next=/cart");
      return;
    }
    const details = e instanceof ApiError ? (e.problem.errors || []).map((x) => x.message) : [];
    show(status, notice([e.message, ...details].join(" "), "error"));
    button.disabled = false;
  } finally {
    placing = false;
  }
}

function signInPage() {
  const next = nextPath("/");
  if (session()) {
    location.replace(next);
    return;
  }
  show(main, title("Sign in"), signInForm(() => location.assign(next), next));
}

function signUpPage() {
  const next = nextPath("/");
  const name = field("name", "Name", { autocomplete: "name", required: true, maxlength: 100 });
  const email = field("email", "Email", { type: "email", autocomplete: "email", required: true });
  const password = field("password", "Password (8 characters or more)", { type: "password", autocomplete: "new-password", required: true, minlength: 8 });
  const status = el("div", { "aria-live": "polite" });
  const submit = el("button", { type: "submit" }, "Create account");
  const form = el("form", { class: "narrow", novalidate: true }, name.node, email.node, password.node, status, submit,
    el("p", {}, "Have an account? ", el("a", { href: `/signin?next=${encodeURIComponent(next)}` }, "Sign in")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    show(status);
    try {
      await api("POST", "/v1/users", { body: { name: name.input.value, email: email.input.value, password: password.input.value }, auth: false });
      await signIn(email.input.value, password.input.value);
      location.assign(next);
    } catch (e) {
      const matched = fieldErrors(e, { name, email, password });
      if (e instanceof ApiError && e.status === 409) {
        email.error.hidden = false;
        email.error.textContent = "An account with this email exists already.";
      } else if (!matched) {
        show(status, notice(e.message, "error"));
      }
      submit.disabled = false;
    }
  });
  show(main, title("Create an account"), form);
}

function statusBadge(order) {
  return el("span", { class: `badge ${order.status}`, id: "order-status" }, order.status);
}

async function ordersPage() {
  if (needSignIn()) return;
  const body = el("tbody");
  const more = el("button", { type: "button", class: "secondary", hidden: true }, "Older orders");
  const empty = el("p", { class: "muted", hidden: true }, "No orders yet.");
  show(main, title("Your orders"), empty, el("div", { class: "table-wrap" }, el("table", { id: "orders" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Order"), el("th", { scope: "col" }, "Placed"),
      el("th", { scope: "col" }, "Status"), el("th", { scope: "col", class: "num" }, "Total"))), body)), el("p", {}, more));
  let cursor = null;
  async function load() {
    const query = new URLSearchParams({ limit: "20" });
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/v1/orders?${query}`);
    for (const o of page.items) {
      body.append(el("tr", {}, el("td", {}, el("a", { href: `/orders/${o.id}` }, o.id.slice(-12))),
        el("td", {}, when(o.created_at)), el("td", {}, statusBadge(o)), el("td", { class: "num" }, money(o.total_cents, o.currency))));
    }
    empty.hidden = body.children.length > 0;
    cursor = page.next_cursor;
    more.hidden = !cursor;
  }
  more.addEventListener("click", () => load().catch((e) => more.replaceWith(notice(e.message, "error"))));
  await load();
}

async function orderPage(id) {
  if (needSignIn()) return;
  const names = {};
  const live = el("div", { "aria-live": "polite", id: "order-live" });
  const items = el("tbody");
  const timeline = el("ul", { class: "timeline" });
  show(main, el("p", {}, el("a", { href: "/orders" }, "← Your orders")), title("Order"),
    el("p", { class: "muted" }, `Order ${id}`), live,
    el("h2", {}, "Items"), el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Product"), el("th", { scope: "col", class: "num" }, "Quantity"),
        el("th", { scope: "col", class: "num" }, "Price"))), items)),
    el("h2", {}, "Timeline"), timeline);
  const seen = [];
  let first = true;
  // Polls until the saga ends (bounded: a pending order is looked at for 10 minutes).
  for (let i = 0; i < (10 * 60 * 1000) / POLL_MS; i++) {
    let order;
    try {
      order = await api("GET", `/v1/orders/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        show(main, title("No such order"), el("p", {}, el("a", { href: "/orders" }, "Your orders")));
        return;
      }
      show(live, notice(`${e.message} (trying again)`, "error"));
      await new Promise((r) => setTimeout(r, 2000));
      continue;
    }
    if (first) {
      first = false;
      await Promise.all(order.items.map(async (it) => {
        try {
          names[it.product_id] = (await api("GET", `/v1/products/${it.product_id}`, { auth: false })).name;
        } catch (_) { names[it.product_id] = it.product_id; }
      }));
      show(items, order.items.map((it) => el("tr", {}, el("td", {}, el("a", { href: `/products/${it.product_id}` }, names[it.product_id])),
        el("td", { class: "num" }, it.quantity), el("td", { class: "num" }, money(it.unit_price_cents * it.quantity, order.currency)))),
        el("tr", {}, el("th", { scope: "row" }, "Total"), el("td"), el("td", { class: "num" }, money(order.total_cents, order.currency))));
      timeline.append(el("li", {}, `${when(order.created_at)}: placed`));
    }
    if (seen.includes(order.status)) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      continue;
    }
    // A new status: shown once, so the live region announces it once.
    seen.push(order.status);
    if (order.status !== "pending") timeline.append(el("li", {}, `${when(order.updated_at)}: ${order.status}`));
    const parts = [el("p", { class: "big" }, "Status: ", statusBadge(order))];
    if (order.status === "pending") parts.push(el("p", { class: "muted" }, "Reserving stock and charging the card…"));
    if (order.status === "completed") parts.push(notice("Thank you! The order is confirmed; a confirmation email is on its way.", "ok"));
    if (order.status === "failed") {
      parts.push(notice(`${REASONS[order.failure_reason] || "The order failed."} (${order.failure_reason})`, "error"));
    }
    if (order.status === "cancelled") parts.push(notice("The order was cancelled."));
    show(live, parts);
    if (order.status !== "pending") return;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

route();
