"""The chat page in headless Chromium: two messages, both replies streamed, the mask drawn with the cached rows
pale. Needs Debian's chromium and chromium-driver and `pip install selenium` (.ci/run installs them); where they are
missing the test is skipped with the reason, except under CI (the CI variable set), where it fails."""
import os

import pytest

from test_engine import USERS
from test_serve import forward_hook, printable_answers, reference, serving

COLOURS = {"U": [47, 111, 179], "A": [217, 130, 43], "pale U": [182, 205, 228]}  # as in tools/chat.html


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "selenium is not installed (pip install selenium)"
    else:
        absent = [path for path in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not os.path.exists(path)]
        missing = f"{' and '.join(absent)} missing (apt-get install chromium chromium-driver)" if absent else None
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the browser test: {missing}")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))  # no driver download
    yield driver
    driver.quit()


def pixel(driver, row, column):
    return driver.execute_script(
        "return Array.from(document.getElementById('canvas').getContext('2d')"
        f".getImageData({column}, {row}, 1, 1).data.slice(0, 3))")


def test_page_streams_replies_and_draws_the_mask(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    with forward_hook(printable_answers), serving() as (port, service):  # answers that fit twice in the context
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "mask ism" in d.find_element(By.ID, "model").text)
        for k, text in enumerate(USERS[:2]):
            browser.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == k + 1)
        messages = browser.execute_script("return messages")
        rows = int(browser.find_element(By.ID, "canvas").get_attribute("data-rows"))
        (session,) = service.sessions.values()
        drawn = [pixel(browser, 0, 0), pixel(browser, rows - 1, 0)]
        browser.find_element(By.ID, "as-prefix").click()
        as_prefix = pixel(browser, 0, 0)
        cost = browser.find_elements(By.CSS_SELECTOR, ".assistant .cost")[-1].text
        want = [reference("ism", messages[:k], 64)["reply"] for k in (1, 3)]  # the page's temperature 0, 64 tokens
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [messages[1]["content"], messages[3]["content"]] == want
    assert rows == len(session.roles)  # one row per token of the conversation
    assert drawn == [COLOURS["pale U"], COLOURS["A"]] and as_prefix == COLOURS["U"]
    assert cost.startswith("prefilled ") and "reused " in cost and "tok/s" in cost


def test_new_chat_during_a_reply_starts_a_clean_conversation(browser):
    import time
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def slowly(module, args, output):  # a reply takes seconds: "New chat" lands in the middle of one
        time.sleep(0.02)

    wait = WebDriverWait(browser, 30)
    with forward_hook(printable_answers), serving() as (port, _):
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "mask ism" in d.find_element(By.ID, "model").text)
        with forward_hook(slowly):
            browser.find_element(By.ID, "input").send_keys(USERS[0], Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "send").text == "Stop")
            browser.find_element(By.ID, "new-chat").click()
        wait.until(lambda d: d.find_element(By.ID, "send").text == "Send")
        browser.find_element(By.ID, "input").send_keys(USERS[1], Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == 1)
        messages = browser.execute_script("return messages")
        want = reference("ism", messages[:1], 64)["reply"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == USERS[1]
    assert messages[1]["content"] == want


def test_the_empty_mask_panel_says_what_will_appear_there(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    with forward_hook(printable_answers), serving() as (port, _):
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "mask ism" in d.find_element(By.ID, "model").text)
        empty = browser.find_element(By.ID, "caption").text
        browser.find_element(By.ID, "input").send_keys(USERS[0], Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == 1)
        drawn = browser.find_element(By.ID, "caption").text
        browser.find_element(By.ID, "new-chat").click()
        again = browser.find_element(By.ID, "caption").text
    assert "Send a message" in empty and "appears here" in empty and again == empty
    assert drawn.endswith("computed this turn.")
