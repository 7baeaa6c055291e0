"""
The sink's web console in a real browser: four replica processes,
`twistd -n fitbroker-sink` serving the console on loopback, and headless
Chromium driven through chromedriver by Selenium.  Events published by
the test appear on the page without reloading, hostile content stays
text, and a screenshot is kept (in the test's folder and in
tests/artifacts/).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.processes import ROOT, ReplicaProcesses, free_ports, twistd, wait_for_port, write_cluster

pytestmark = pytest.mark.integration

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if os.path.exists("/usr/lib/chromium/chromedriver") else None
)

try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or selenium is None,
    reason="needs Debian's chromium and chromium-driver and the selenium package "
    "(.ci/run installs them)",
)

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def fitbroker(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from fit_broker.cli import main; sys.exit(main())", *args],
        cwd=ROOT, capture_output=True, timeout=60, env=env,
    )


def read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


@pytest.fixture
def console(tmp_path):
    folder = str(tmp_path)
    config, ports = write_cluster(folder, ["events", "alerts"])
    [port] = free_ports(1)
    with open(os.path.join(folder, "sink.toml"), "w") as f:
        f.write(
            'client = "console"\nchannels = ["events"]\n\n'
            '[[sinks]]\nkind = "file"\npath = "events.jsonl"\n\n'
            f'[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\nchannels = ["alerts"]\n'
        )
    replicas = ReplicaProcesses(folder, config, ports)
    sink = None
    try:
        replicas.start_all()
        log = os.path.join(folder, "sink.out")
        with open(log, "wb") as out:
            sink = subprocess.Popen(
                twistd() + ["-n", "--pidfile", "sink.pid", "fitbroker-sink", "--config", config],
                cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=replicas.env(),
            )
        wait_for_port(port, 20, sink)
        deadline = time.monotonic() + 20
        while read(log).count("sink subscribed to") < 2:
            assert sink.poll() is None and time.monotonic() < deadline, read(log)[-3000:]
            time.sleep(0.1)
        yield {"url": f"http://127.0.0.1:{port}/", "config": config, "folder": folder, "log": log}
    finally:
        if sink is not None and sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            try:
                sink.wait(10)
            except subprocess.TimeoutExpired:
                sink.kill()
        replicas.stop_all()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_health_json_and_host_guard(console):
    """/health reports the replicas' links and sinks; a foreign Host header is refused (DNS rebinding)."""
    with urllib.request.urlopen(console["url"] + "health", timeout=10) as response:
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        health = json.load(response)
    assert [r["index"] for r in health["replicas"]] == [0, 1, 2, 3]
    assert health["sinks"]["file-0"]["state"] == "up"
    assert health["channels"]["alerts"] == {"forwarded": False, "subscribed": True}
    request = urllib.request.Request(console["url"], headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 421


@needs_browser
def test_published_events_appear_live(console, tmp_path):
    """Events published after the page loaded appear without reloading; hostile content stays text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    marker = "m" + uuid.uuid4().hex[:10]
    driver = browser()
    try:
        driver.get(console["url"] + "?channel=events")
        wait = WebDriverWait(driver, 20, poll_frequency=0.1)
        wait.until(lambda d: d.find_element(By.ID, "stream-state").text == "live")
        wait.until(lambda d: d.find_element(By.ID, "replicas").text.count("linked") == 4)

        result = fitbroker("publish", "--config", console["config"], "events", f"hello {marker}", HOSTILE)
        assert result.returncode == 0, result.stderr.decode()

        def rows(d):
            return [r.text for r in d.find_elements(By.CSS_SELECTOR, "#events tr.event")]

        wait.until(lambda d: any(marker in r for r in rows(d)) and any("onerror" in r for r in rows(d)))
        assert any(HOSTILE in r for r in rows(driver))
        assert driver.execute_script("return window.__pwned === undefined")
        assert driver.find_elements(By.CSS_SELECTOR, "#events img, #events script") == []
        wait.until(lambda d: "file-0: up, 2 forwarded, 0 held" in d.find_element(By.ID, "sinks").text)

        # Choosing another channel tails it instead, still without reloading.
        Select(driver.find_element(By.ID, "channel")).select_by_value("alerts")
        wait.until(lambda d: d.find_element(By.ID, "stream-state").text == "live")
        result = fitbroker("publish", "--config", console["config"], "alerts", f"alert {marker}")
        assert result.returncode == 0, result.stderr.decode()
        wait.until(lambda d: [r for r in rows(d) if f"alert {marker}" in r])
        assert not [r for r in rows(driver) if f"hello {marker}" in r]

        Select(driver.find_element(By.ID, "channel")).select_by_value("events")
        wait.until(lambda d: any(marker in r for r in rows(d)))
        shot = tmp_path / "console.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.stat().st_size > 1000
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copy(shot, os.path.join(ARTIFACTS, "console.png"))
    # The file sink forwarded what the page showed.
    lines = [json.loads(x) for x in read(os.path.join(console["folder"], "events.jsonl")).splitlines()]
    assert {f"hello {marker}", HOSTILE} <= {r["content"] for r in lines}
