"""The storefront and the operations console in a real browser (headless
Chromium driven by Selenium), against the real binary on a fresh data folder.

Run by scripts/browser-tests, which gives SCALESHOP_BIN and the artifacts folder
(screenshots at 375 px and 1280 px wide)."""

import asyncore
import json
import os
import shutil
import smtpd
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid
import warnings
import zlib

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

ADMIN_EMAIL = "browser-admin@example.com"
ADMIN_PASSWORD = "browser-admin-password"
ARTIFACTS = os.environ.get("SCALESHOP_BROWSER_ARTIFACTS", os.path.join(tempfile.gettempdir(), "scaleshop-browser"))
WAIT = 30  # seconds for anything the page waits on


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(width, height):
    """A small valid PNG (a colour gradient)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 140)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Api:
    """The JSON API, as a test client."""

    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, token=None, content_type="application/json", headers=None):
        data = None
        h = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h["Content-Type"] = content_type
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, (json.loads(raw) if raw else None)

    def ok(self, method, path, **kw):
        status, body = self.call(method, path, **kw)
        assert 200 <= status < 300, f"{method} {path}: {status} {body}"
        return body

    def sign_in(self, email, password):
        return self.ok("POST", "/v1/sessions", body={"email": email, "password": password})["token"]

    def user(self, email, password="a-good-password"):
        self.ok("POST", "/v1/users", body={"email": email, "name": email.split("@")[0], "password": password})
        return self.sign_in(email, password)


class Sink(smtpd.SMTPServer):
    """A real SMTP server that keeps what it receives."""

    def __init__(self, port):
        super().__init__(("127.0.0.1", port), None, decode_data=False)
        self.messages = []

    def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
        self.messages.append((mailfrom, rcpttos, data))


class Server:
    """The binary on a fresh data folder and a free port; email goes to an SMTP
    port where nothing listens until a test starts the sink there."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="scaleshop-browser-")
        self.smtp_port = free_port()
        env = dict(os.environ)
        env.update({
            "SCALESHOP_HTTP_ADDR": "127.0.0.1:0",
            "SCALESHOP_DATA_DIR": os.path.join(self.dir, "data"),
            "SCALESHOP_ADMIN_EMAIL": ADMIN_EMAIL,
            "SCALESHOP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "SCALESHOP_SMTP_URL": f"smtp://127.0.0.1:{self.smtp_port}",
            "SCALESHOP_SMTP_TIMEOUT_MS": "2000",
            "SCALESHOP_JOB_MIN_BACKOFF_MS": "50",
            "SCALESHOP_JOB_MAX_BACKOFF_MS": "200",
            "SCALESHOP_LOG_FILTER": "warn,scaleshop_app::server=info",
        })
        self.log_path = os.path.join(self.dir, "server.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([os.environ["SCALESHOP_BIN"], "serve"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        self.base = None
        while time.monotonic() < deadline and self.base is None:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    marker = '"listening on http://127.0.0.1:'
                    if marker in line:
                        port = line.split(marker, 1)[1].split('"', 1)[0]
                        self.base = f"http://127.0.0.1:{port}"
                        break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if self.base is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + open(self.log_path).read())
        self.api = Api(self.base)
        self.sink = None
        self.sink_thread = None

    def start_sink(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.sink = Sink(self.smtp_port)
        self.sink_thread = threading.Thread(target=asyncore.loop, kwargs={"timeout": 0.1}, daemon=True)
        self.sink_thread.start()

    def stop(self):
        if self.sink is not None:
            self.sink.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-sync", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(WAIT)
    return driver


class Ui(unittest.TestCase):
    server = None
    products = {}

    @classmethod
    def setUpClass(cls):
        os.makedirs(ARTIFACTS, exist_ok=True)
        cls.server = Server()
        api = cls.server.api
        cls.admin = api.sign_in(ADMIN_EMAIL, ADMIN_PASSWORD)
        catalog = [
            ("MUG-BLUE", "Blue enamel mug", "A sturdy enamel mug for camp coffee.", 1250),
            ("MUG-GREEN", "Green stoneware mug", "Hand-glazed stoneware, 350 ml.", 1800),
            ("TEAPOT-RED", "Red cast-iron teapot", "Keeps tea hot for an hour.", 4900),
            ("KETTLE", "Stovetop kettle", "Whistles when the water boils.", 3500),
        ]
        for sku, name, description, price in catalog:
            p = api.ok("POST", "/v1/products", token=cls.admin, body={
                "sku": sku, "name": name, "description": description, "price_cents": price,
                "currency": "USD", "initial_stock": 100})
            cls.products[sku] = p
        image = api.ok("POST", f"/v1/products/{cls.products['MUG-BLUE']['id']}/images", token=cls.admin,
                       body=png(320, 240), content_type="image/png")
        deadline = time.monotonic() + WAIT
        while api.ok("GET", f"/v1/images/{image['id']}")["status"] == "processing":
            assert time.monotonic() < deadline, "the image was not processed in time"
            time.sleep(0.2)

    @classmethod
    def tearDownClass(cls):
        if cls.server is not None:
            cls.server.stop()

    def setUp(self):
        self.driver = browser()
        self.wait = WebDriverWait(self.driver, WAIT)

    def tearDown(self):
        try:
            self.assert_no_console_errors()
        finally:
            self.driver.quit()

    # ---- helpers ---------------------------------------------------------------

    def open(self, path):
        self.driver.get(self.server.base + path)

    def fill(self, element_id, text):
        e = self.wait.until(EC.element_to_be_clickable((By.ID, element_id)))
        e.clear()
        e.send_keys(text)

    def click_button(self, text):
        self.wait.until(EC.element_to_be_clickable(
            (By.XPATH, f"//button[normalize-space()='{text}']"))).click()

    def screenshot(self, name):
        """The page at a phone's and a desktop's width, as test artifacts."""
        for width in (375, 1280):
            self.driver.set_window_size(width, 900)
            time.sleep(0.2)
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(width, min(max(height, 600), 4000))
            time.sleep(0.2)
            self.driver.save_screenshot(os.path.join(ARTIFACTS, f"{name}-{width}.png"))
        self.driver.set_window_size(1280, 900)

    def assert_no_console_errors(self):
        errors = [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]
        self.assertEqual(errors, [], "the page logged errors to the console")

    def sign_up_in_browser(self, email, next_path="/"):
        self.open(f"/signup?next={next_path}")
        self.fill("name", "Ada Shopper")
        self.fill("email", email)
        self.fill("password", "a-good-password")
        self.click_button("Create account")
        self.wait.until(EC.presence_of_element_located((By.XPATH, f"//*[@id='nav-account'][contains(., '{email}')]")))

    def sign_in_in_browser(self, email, password, path="/signin"):
        self.open(path)
        self.fill("email", email)
        self.fill("password", password)
        self.click_button("Sign in")

    def add_to_cart(self, name):
        self.wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f"button[aria-label='Add {name} to cart']"))).click()
        self.wait.until(EC.text_to_be_present_in_element((By.ID, "cart-status"), name))

    def wait_for_order(self, status):
        self.wait.until(lambda d: "/orders/" in d.current_url)
        self.wait.until(EC.text_to_be_present_in_element((By.ID, "order-status"), status))
        return self.driver.current_url.rsplit("/", 1)[1]

    # ---- the tests ----------------------------------------------------------------

    def test_1_a_shopper_signs_up_searches_checks_out_with_a_double_click_and_sees_one_completed_order(self):
        email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
        self.sign_up_in_browser(email)
        self.fill("q", "mug")
        self.click_button("Search")
        self.wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Results for"))
        cards = self.driver.find_elements(By.CSS_SELECTOR, "#products li")
        names = [c.find_element(By.TAG_NAME, "h2").text for c in cards]
        self.assertEqual(sorted(names), ["Blue enamel mug", "Green stoneware mug"], names)
        # The processed image's thumbnail is on the card.
        thumb = self.wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#products img.thumb")))
        self.wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", thumb))
        self.screenshot("storefront-search")
        self.add_to_cart("Blue enamel mug")
        self.add_to_cart("Green stoneware mug")
        self.assertEqual(self.driver.find_element(By.ID, "cart-count").text, "2")

        self.driver.find_element(By.CSS_SELECTOR, "a[href='/products/%s']" % self.products["MUG-BLUE"]["id"]).click()
        self.wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Blue enamel mug"))
        self.wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('.gallery img'); return i && i.complete && i.naturalWidth > 0"))
        self.screenshot("product")

        self.driver.find_element(By.ID, "nav-cart").click()
        self.wait.until(EC.text_to_be_present_in_element((By.ID, "cart-total"), "$30.50"))
        Select(self.driver.find_element(By.ID, "payment-method")).select_by_value("pm_card_visa")
        self.screenshot("cart")
        button = self.wait.until(EC.element_to_be_clickable((By.ID, "checkout")))
        ActionChains(self.driver).double_click(button).perform()
        order_id = self.wait_for_order("completed")
        self.assertIn("confirmed", self.driver.find_element(By.ID, "order-live").text)
        self.screenshot("order-completed")

        token = self.server.api.sign_in(email, "a-good-password")
        # The order list is a read model that follows the log: a moment behind
        # the order page at most (bounded wait).
        deadline = time.monotonic() + 10
        while True:
            orders = self.server.api.ok("GET", "/v1/orders", token=token)["items"]
            if (orders and orders[0]["status"] == "completed") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual([o["id"] for o in orders], [order_id], "exactly one order")
        self.assertEqual(orders[0]["status"], "completed")
        self.assertEqual(sorted(i["product_id"] for i in orders[0]["items"]),
                         sorted([self.products["MUG-BLUE"]["id"], self.products["MUG-GREEN"]["id"]]))
        charges = self.server.api.ok("GET", f"/v1/payments?order_id={order_id}", token=self.admin)["items"]
        self.assertEqual([c["status"] for c in charges], ["succeeded"], "charged once")

        self.open("/orders")
        self.wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"#orders a[href='/orders/{order_id}']")))
        self.assertEqual(len(self.driver.find_elements(By.CSS_SELECTOR, "#orders tbody tr")), 1)
        self.screenshot("order-history")

    def test_2_a_declined_card_shows_its_reason(self):
        email = f"bo-{uuid.uuid4().hex[:8]}@example.com"
        self.server.api.user(email)
        self.sign_in_in_browser(email, "a-good-password", path="/signin?next=/")
        self.wait.until(EC.presence_of_element_located((By.ID, "products")))
        self.add_to_cart("Red cast-iron teapot")
        self.open("/cart")
        Select(self.wait.until(EC.presence_of_element_located((By.ID, "payment-method")))).select_by_value(
            "pm_card_chargeDeclined")
        self.click_button("Place order")
        self.wait_for_order("failed")
        live = self.driver.find_element(By.ID, "order-live").text
        self.assertIn("Your card was declined", live)
        self.assertIn("payment_declined", live)
        self.screenshot("order-declined")

    def test_3_the_console_shows_a_dead_job_and_its_retry_button_makes_it_run(self):
        api = self.server.api
        # The forced failure: no SMTP server listens yet, so the welcome email's
        # job fails on every attempt and is dead after the last.
        before = {j["id"] for j in api.ok("GET", "/v1/jobs?state=dead&limit=100", token=self.admin)["items"]}
        api.user(f"cy-{uuid.uuid4().hex[:8]}@example.com")
        deadline = time.monotonic() + WAIT
        dead = []
        while not dead:
            self.assertLess(time.monotonic(), deadline, "no job died")
            items = api.ok("GET", "/v1/jobs?queue=email&state=dead&limit=100", token=self.admin)["items"]
            dead = [j for j in items if j["id"] not in before]
            time.sleep(0.2)
        job = dead[0]

        self.sign_in_in_browser(ADMIN_EMAIL, ADMIN_PASSWORD, path="/console")
        row = self.wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f"tr[data-job='{job['id']}']")))
        self.assertIn("dead", row.text)
        self.assertIn("email", row.text)
        # The rest of the console is there and filled from /metrics and /readyz.
        self.wait.until(lambda d: "GET" in d.find_element(By.ID, "traffic").text)
        for section in ("cache", "messaging", "database", "jobs", "dead-events"):
            self.assertTrue(self.driver.find_element(By.ID, section).is_displayed(), section)
        self.assertIn("database", self.driver.find_element(By.ID, "database").text)
        self.screenshot("console")

        self.server.start_sink()
        self.driver.find_element(By.CSS_SELECTOR, f"button[data-job='{job['id']}']").click()
        deadline = time.monotonic() + WAIT
        while api.ok("GET", f"/v1/jobs/{job['id']}", token=self.admin)["state"] != "completed":
            self.assertLess(time.monotonic(), deadline, "the retried job did not complete")
            time.sleep(0.2)
        self.assertTrue(self.server.sink.messages, "the retried email reached the SMTP server")
        self.wait.until(EC.invisibility_of_element_located((By.CSS_SELECTOR, f"tr[data-job='{job['id']}']")))

    def test_4_pages_answer_at_every_width_without_console_errors(self):
        for path in ("/", "/signin", "/signup", "/cart", "/products/" + self.products["KETTLE"]["id"], "/console"):
            self.open(path)
            self.wait.until(lambda d: "Loading" not in d.find_element(By.ID, "main").text)
            self.driver.set_window_size(375, 800)
            overflow = self.driver.execute_script(
                "return document.documentElement.scrollWidth > document.documentElement.clientWidth")
            self.assertFalse(overflow, f"{path} scrolls sideways at 375 px")
            self.driver.set_window_size(1280, 900)
        # Keyboard: the first Tab reaches the skip link, and focus is visible.
        self.open("/")
        self.wait.until(EC.presence_of_element_located((By.ID, "products")))
        ActionChains(self.driver).send_keys("\ue004").perform()
        focused = self.driver.switch_to.active_element
        self.assertEqual(focused.text, "Skip to content")
        outline = self.driver.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
        self.assertNotEqual(outline, "none")


if __name__ == "__main__":
    unittest.main(verbosity=2)
