"""Regenerate docs/web_chat.png, the README's picture of the web chat page: the demo's two runs
(`make demo`: demo_out/run and demo_out/run-cinego) served side by side, a validation video
picked, two questions asked, photographed by the headless chromium the tests use.

    .venv/bin/python docs/screenshot_web.py [--demo-out demo_out] [--out docs/web_chat.png]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ("What is the color of the shape in the video?", "Where is the object going?")  # as its manifest asks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "web_chat.png")
    parser.add_argument("--video", help="video id to pick (default: the first of the validation split)")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from trainer.web import ServeConfig, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start(ServeConfig(run=args.demo_out / "run", compare=args.demo_out / "run-cinego", port=port, threads=1))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1050"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(30)
    try:
        driver.get(server.url)
        box = driver.find_element(By.CSS_SELECTOR, "#row input")
        box.click()
        box.send_keys(args.video or "· val ·")
        driver.find_element(By.CSS_SELECTOR, "[role=option]").click()
        wait_for(driver, lambda text: "Ask a question" in text)
        for question in QUESTIONS:
            field = driver.find_element(By.CSS_SELECTOR, "#question textarea")
            field.send_keys(question, Keys.ENTER)
            time.sleep(0.5)
            wait_for(driver, lambda text: text.startswith("Answered"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(args.out)
    finally:
        driver.quit()
        server.close()
    return 0


def wait_for(driver, done, timeout: float = 60.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = driver.execute_script("return document.querySelector('#status').innerText.trim()")
        if done(text):
            return
        time.sleep(0.05)
    raise SystemExit(f"the page did not get there in {timeout:.0f} s (status: {text!r})")


if __name__ == "__main__":
    sys.exit(main())
