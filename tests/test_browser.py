"""A real browser: Debian's headless Chromium fills the lead form, and the lead sequence's
first message reaches the lead through the running daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from support import add_adapter, apply_text, free_port, outbox_messages, running_daemon, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)

LEADS = """
[sequence]
key = "leads"

[[steps]]
key = "welcome"
channel = "email"
subject = "Welcome, {{ first_name }}"
text = "Hi {{ first_name }}, thanks for asking about: {{ notes }}"

[[steps]]
key = "follow_up"
channel = "email"
after = "2d"
subject = "Still interested, {{ first_name }}?"
text = "Just checking in."
"""


def _install_chromium() -> None:
    """Install Debian's chromium and chromium-driver when they are missing, as root or with
    passwordless sudo (a fresh machine has neither); otherwise fail and say how."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
    for command in ([*apt, "update"], [*apt, "install", "-y", "chromium", "chromium-driver"]):
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.fail(
                f"{CHROMIUM} and {CHROMEDRIVER} are needed (this test drives Debian's "
                f"Chromium) and could not be installed ({exc}); run "
                "`apt-get install -y chromium chromium-driver` as root."
            )


def _chromium(profile: Path) -> WebDriver:
    """Debian's Chromium through Debian's chromedriver; selenium-manager never runs."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    # A driver path in the Service is what keeps selenium-manager from looking for one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


def _by_label(driver: WebDriver, label: str) -> Any:
    """The control a visible label names, found as a person (or a screen reader) would."""
    target = driver.find_element(By.XPATH, f"//label[normalize-space()='{label}']")
    return driver.find_element(By.ID, target.get_attribute("for"))


def fill_lead_form(url: str, profile: Path, lead: dict[str, str]) -> str:
    """Open the form, type the lead in, send it, and return the page's heading after."""
    driver = _chromium(profile)
    try:
        driver.get(url)
        for label, value in lead.items():
            _by_label(driver, label).send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        WebDriverWait(driver, 30).until(lambda d: "Thanks" in d.title + d.page_source)
        heading: str = driver.find_element(By.TAG_NAME, "h1").text
        return heading
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a fresh machine installs Chromium first
async def test_a_browser_lead_gets_the_first_message(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    _install_chromium()
    await apply_text(pool, LEADS)
    outbox = tmp_path / "outbox.jsonl"
    await add_adapter(
        pool, name="mail", channel="email", provider="outbox", config={"path": str(outbox)}
    )
    port = free_port()
    sections = {
        "http": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "leads": {"enabled": True, "sequence": "leads"},
    }
    async with running_daemon(dsn, tmp_path, sections=sections):
        typed = {
            "Name": "Grace Hopper",
            "Email": "Grace.Hopper@Example.com",
            "Phone": "(202) 555-0143",
            "Notes": "the annual plan",
        }
        # Selenium blocks; in a thread, the event loop keeps serving the browser.
        heading = await asyncio.to_thread(
            fill_lead_form, f"http://127.0.0.1:{port}/leads/new", tmp_path / "chromium", typed
        )
        assert heading == "Thanks, Grace Hopper"
        (message,) = await wait_for(lambda: outbox_messages(outbox), timeout=30)
    assert message["channel"] == "email"
    assert message["to"] == "grace.hopper@example.com"
    assert message["subject"] == "Welcome, Grace"
    assert message["text"] == "Hi Grace, thanks for asking about: the annual plan"
    assert message["metadata"]["sequence_key"] == "leads"
    assert message["metadata"]["step_key"] == "welcome"
    lead = await pool.fetchrow("SELECT * FROM dripd.leads")
    assert lead["phone"] == "+12025550143"
    assert message["metadata"]["enrollment_id"] == str(lead["enrollment_id"])
