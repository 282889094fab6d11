"""An admin at the status page, in a real browser (Debian's chromium and chromedriver, driven
by Selenium): signs in with ?key=, reads every card, reconnects one connection with the
keyboard, walks the consent at the test upstream, comes back to the status page and reads it
again; also at phone width and in the dark scheme. Writes what it saw as JSON (the Rust test
asserts on it) and screenshots.

usage: status_page.py BASE_URL ADMIN_KEY CONNECTION OUT_DIR
"""

import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

base, admin_key, connection, out_dir = sys.argv[1:5]
os.makedirs(out_dir, exist_ok=True)
# No Selenium Manager: it would try to download a driver. Debian's are on the PATH.
os.environ["SE_OFFLINE"] = "true"

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for arg in (
    "--headless=new",
    "--no-sandbox",  # root in CI containers
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--window-size=1280,1000",
):
    options.add_argument(arg)
service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
driver = webdriver.Chrome(options=options, service=service)
wait = WebDriverWait(driver, 20)
report = {}


def cards():
    """Every card: name, state sentence, forecast, organisations, URL box, button."""
    seen = []
    for card in driver.find_elements(By.CSS_SELECTOR, "li.card"):
        heading = card.find_element(By.TAG_NAME, "h2")
        button = card.find_element(By.CSS_SELECTOR, "a.button")
        url_box = card.find_element(By.CSS_SELECTOR, "input[readonly]")
        label = card.find_element(By.CSS_SELECTOR, f"label[for='{url_box.get_attribute('id')}']")
        seen.append(
            {
                "id": heading.get_attribute("id"),
                "heading": heading.text,
                "state": card.find_element(By.CSS_SELECTOR, ".state").text,
                "forecast": card.find_element(By.CSS_SELECTOR, ".forecast").text,
                "text": card.text,
                "refresh_url": url_box.get_attribute("value"),
                "url_label": label.text,
                "button": button.accessible_name,
                "button_href": button.get_attribute("href"),
            }
        )
    return seen


try:
    # Sign in: ?key= once, then the page goes on without it.
    driver.get(f"{base}/api/connections?key={admin_key}")
    wait.until(lambda d: "key=" not in d.current_url and d.find_elements(By.CSS_SELECTOR, "li.card"))
    report["signed_in_url"] = driver.current_url
    report["title"] = driver.title
    report["lang"] = driver.find_element(By.TAG_NAME, "html").get_attribute("lang")
    report["before"] = cards()
    report["scripts"] = len(driver.find_elements(By.TAG_NAME, "script"))
    report["page_source_before"] = driver.page_source
    driver.save_screenshot(os.path.join(out_dir, "status-page-before.png"))

    # Reconnect with the keyboard: focus the card's button, press Enter.
    button = driver.find_element(By.CSS_SELECTOR, f"li.card a.button[href$='/api/authorize/{connection}']")
    driver.execute_script("arguments[0].focus()", button)
    report["focused_is_button"] = driver.switch_to.active_element == button
    button.send_keys(Keys.ENTER)
    # The consent runs through the upstream and ends on the broker's callback page.
    wait.until(lambda d: "/api/callback" in d.current_url and d.find_elements(By.TAG_NAME, "h1"))
    report["callback_heading"] = driver.find_element(By.TAG_NAME, "h1").text
    back = driver.find_element(By.LINK_TEXT, "Back to the connections")
    back.click()
    wait.until(lambda d: d.current_url.rstrip("/").endswith("/api/connections") and d.find_elements(By.CSS_SELECTOR, "li.card"))
    report["after"] = cards()
    report["page_source_after"] = driver.page_source
    driver.save_screenshot(os.path.join(out_dir, "status-page.png"))

    # A phone: nothing wider than the screen.
    driver.set_window_size(390, 844)
    report["phone_overflow"] = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth"
    )
    driver.save_screenshot(os.path.join(out_dir, "status-page-phone.png"))

    # The dark scheme follows the browser.
    driver.set_window_size(1280, 1000)
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    report["dark_background"] = driver.execute_script(
        "return getComputedStyle(document.body).backgroundColor"
    )
    driver.save_screenshot(os.path.join(out_dir, "status-page-dark.png"))
finally:
    driver.quit()

with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
print("status page walked:", len(report.get("after", [])), "cards")
