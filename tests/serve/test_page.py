"""The live page (`/`, `/batches/{id}`, `tokenmill status --web`) in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): it asks for the API key, then shows a batch's progress rise while it runs and
its state reach completed, with the chart, cost and file buttons; a finished `tokenmill run` job served by
`status --web` reads the same. Every wait follows the batch's own progress (the page's DOM), bounded; screenshots
are saved in the test's directory (and in $TOKENMILL_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from helpers import tokenmill_cmd, write_jsonl
from test_batches_api import MODEL
from test_server import KEY, Server, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# the job card's state as the page shows it
JOB_STATE = """
const el = document.querySelector(`.job[data-job-id="${arguments[0]}"]`);
if (!el) return null;
const text = (sel) => { const x = el.querySelector(sel); return x ? x.textContent : null; };
return {status: el.dataset.status, done: text(".done"), total: text(".total"),
        chart: el.querySelectorAll("svg.chart polyline").length, text: el.textContent};
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no Chromium on this machine: the page test needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them where it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, path) -> None:
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TOKENMILL_TEST_ARTIFACTS"):
        shutil.copy(path, os.environ["TOKENMILL_TEST_ARTIFACTS"])


def until(what, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"the page never showed {what}")


def count(text: str | None) -> int:
    return int((text or "0").replace(",", "").replace("\u202f", "").replace("\xa0", ""))


def get_status(port: int, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_shows_a_batch_rise_to_completed(cli_env, smollm2, tmp_path, browser):
    s = Server(cli_env, "--api-key", KEY, "--state-dir", tmp_path / "state", "--max-model-len", 256,
               "--max-num-seqs", 4, "--gpu-hourly-rate", 3.0)
    try:
        assert get_status(s.port, None)[0] == 401  # the data is under the key; the page itself is not
        browser.get(f"http://127.0.0.1:{s.port}/")
        until("the key prompt", lambda: browser.find_element("id", "auth").is_displayed())
        browser.get(f"http://127.0.0.1:{s.port}/?interval_ms=250#key={KEY}")
        until("the engine ready", lambda: browser.execute_script(
            "const e = document.getElementById('server-status'); return e && e.textContent === 'ok';"))
        assert "No batches yet" in browser.find_element("id", "jobs").text

        c = s.client()
        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "max_tokens": 48, "temperature": 0,
                          "messages": [{"role": "user", "content": f"Tell a long story about a robot named R{i}."}]}}
                for i in range(32)]
        f = c.files.create(file=("page.jsonl", write_jsonl(tmp_path / "page.jsonl", rows).read_bytes()),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        seen = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            st = browser.execute_script(JOB_STATE, b.id)
            if st is not None:
                seen.append((st["status"], count(st["done"]), count(st["total"])))
                if st["status"] == "completed":
                    break
            time.sleep(0.1)
        assert seen and seen[-1] == ("completed", 32, 32), seen[-5:]
        done = [d for _, d, _ in seen]
        assert done == sorted(done)  # progress only rises
        assert any(status == "in_progress" and 0 < d < 32 for status, d, _ in seen), sorted(set(seen))
        screenshot(browser, tmp_path / "batches.png")

        browser.get(f"http://127.0.0.1:{s.port}/batches/{b.id}")  # the key stays in this browser
        st = until("the batch's chart", lambda: (lambda x: x if x and x["chart"] else None)(
            browser.execute_script(JOB_STATE, b.id)))
        assert st["status"] == "completed" and "per million tokens" in st["text"] and "$" in st["text"]
        buttons = browser.find_elements("css selector", ".job button[data-file]")
        assert [x.text for x in buttons] == ["download output"]
        code, data = get_status(s.port, KEY)
        job = data["jobs"][0]
        assert code == 200 and job["id"] == b.id and job["progress"]["tokens"] == c.batches.retrieve(
            b.id).usage.total_tokens
        assert job["progress"]["cost_usd"] == pytest.approx(3.0 * job["progress"]["elapsed_s"] / 3600)
        screenshot(browser, tmp_path / "batch.png")
    finally:
        s.stop()


def test_status_web_serves_the_page_for_a_run_job(run_cli, cli_env, tmp_path, browser):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Say {i}."} for i in range(6)] + ["{broken"])
    out = tmp_path / "out.jsonl"
    run_cli("run", src, "-o", out, "--max-tokens", 8, "--max-model-len", 256, "--quiet", check=1)
    assert run_cli("status", tmp_path / "nothing.jsonl", "--web", check=2).stderr.count("\n") == 1
    port = free_port()
    proc = subprocess.Popen(tokenmill_cmd("status", out, "--web", "--port", port, "--gpu-hourly-rate", 2.0),
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def answered():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return get_status(port, None)
            except OSError:
                return None

        code, data = until("status --web listening", answered, timeout=120)
        job = data["jobs"][0]
        assert code == 200 and data["kind"] == "job" and job["status"] == "completed"
        assert job["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
        assert job["progress"]["cost_usd"] > 0 and job["progress"]["history"]
        browser.get(f"http://127.0.0.1:{port}/")
        st = until("the job", lambda: browser.execute_script(JOB_STATE, "out.jsonl"))
        assert (st["status"], count(st["done"]), count(st["total"])) == ("completed", 6, 7)
        assert str(out) in st["text"]
        screenshot(browser, tmp_path / "status-web.png")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
