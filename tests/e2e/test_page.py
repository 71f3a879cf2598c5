"""The web page `serve` hosts at /, in a real browser: the distribution's headless Chromium and chromedriver
(`apt-get install chromium chromium-driver`, as .ci/run does), driven by Selenium with both given explicitly so
that Selenium Manager never downloads anything. The servers are child processes on loopback ports, stopped by
their PIDs; the page talks only to them.

Set CONVLLAVA_EDGE_SCREENSHOT=docs/page.png to keep the screenshot of the first answer (the README shows it).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from support.serving import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes-1.png"
KEY = "page-key-456"
QUESTION = "How many shapes are there?"
WAIT_S = 60


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the page's tests need the distribution's browser: apt-get install chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should it run at all, stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("page"), "--api-key", KEY, "--max-tokens-cap", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def endless_server(tmp_path_factory):
    """A tiny bundle whose LLM never emits </s>, one decoding thread: an answer runs until Stop."""
    from support.tiny import write_endless

    from convllava_edge.export.bundle import ExportOptions, export_bundle

    tmp = tmp_path_factory.mktemp("endless")
    bundle = tmp / "endless"
    export_bundle(write_endless(tmp / "checkpoint"), bundle, ExportOptions(vision_types=("fp32",)))
    s = Server(tmp, "--model", str(bundle), "--threads", "1", "--max-tokens-cap", "4000")
    yield s
    s.stop()


def open_page(driver, server) -> None:
    """The page, with the API key entered in its form when the server asks for one."""
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option") or d.find_element(By.ID, "key").is_displayed())
    if not driver.find_elements(By.CSS_SELECTOR, "#model option"):
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))


def choose_image(driver, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, WAIT_S).until(lambda d: path.name in d.find_element(By.ID, "image-info").text)


def ask(driver, question: str) -> None:
    box = driver.find_element(By.ID, "question")
    box.send_keys(question, Keys.ENTER)


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log li.assistant")


def wait_answered(driver, n: int):
    """The n-th answer once complete (its timing line shown), or the error text if the request failed."""
    WebDriverWait(driver, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log li.assistant .timing")) >= n or d.find_element(By.ID, "error").text)
    assert not driver.find_element(By.ID, "error").text, driver.find_element(By.ID, "error").text
    return answers(driver)[n - 1]


def metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_an_image_question_streams_its_answer_and_a_follow_up_is_cached(driver, server, tmp_path):
    open_page(driver, server)
    choose_image(driver, EXAMPLE)
    info = driver.find_element(By.ID, "image-info").text
    width, height = Image.open(EXAMPLE).size
    assert "36 image tokens" in info and f"{width}×{height} px" in info  # the rule /v1/models publishes
    assert driver.find_element(By.ID, "thumb").get_attribute("alt")
    ask(driver, QUESTION)
    first = wait_answered(driver, 1)
    assert first.find_element(By.CLASS_NAME, "text").text.strip() == "3"
    timing = first.find_element(By.CLASS_NAME, "timing").text
    assert re.search(r"encode \d+ ms", timing) and "first token" in timing and "tokens/s" in timing
    assert len(first.find_elements(By.CSS_SELECTOR, ".bar span")) == 4
    driver.save_screenshot(os.environ.get("CONVLLAVA_EDGE_SCREENSHOT") or str(tmp_path / "page.png"))
    ask(driver, "What color is the circle?")
    second = wait_answered(driver, 2)
    assert second.find_elements(By.CLASS_NAME, "cached"), second.text  # the first turn's KV state, reused
    assert not first.find_elements(By.CLASS_NAME, "cached")


def test_a_second_image_joins_the_conversation_and_new_conversation_starts_over(driver, server, tmp_path):
    open_page(driver, server)
    choose_image(driver, EXAMPLE)
    ask(driver, QUESTION)
    first = wait_answered(driver, 1)
    assert "(36 image)" in first.find_element(By.CLASS_NAME, "timing").text
    other = tmp_path / "second.png"
    Image.open(EXAMPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    choose_image(driver, other)
    notices = [n.text for n in driver.find_elements(By.CSS_SELECTOR, "#log li.notice")]
    assert "second.png added to this conversation" in notices[-1]
    listed = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#images li")]
    assert listed == [EXAMPLE.name, "second.png (goes with your next question)"]
    ask(driver, QUESTION)
    second = wait_answered(driver, 2)
    timing = second.find_element(By.CLASS_NAME, "timing").text
    assert "(72 image)" in timing, timing  # both images are in the prompt
    assert second.find_elements(By.CLASS_NAME, "cached")  # the first turn, image and all, from the KV cache
    driver.find_element(By.ID, "new").click()
    assert not driver.find_element(By.ID, "images").is_displayed()
    ask(driver, "What is two plus two?")  # no image now: a text-only question
    assert "(0 image)" in wait_answered(driver, 3).find_element(By.CLASS_NAME, "timing").text


def test_the_servers_errors_are_shown_in_words_and_the_page_goes_on(driver, server, tmp_path):
    open_page(driver, server)
    notes = tmp_path / "notes.png"
    notes.write_text("these are notes, not pixels")
    choose_image(driver, notes)
    assert "no preview" in driver.find_element(By.ID, "image-info").text
    ask(driver, QUESTION)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "error").text)
    error = driver.find_element(By.ID, "error").text
    assert re.search(r"not an image file|cannot decode", error), error  # the server's words
    assert not answers(driver)  # the failed answer is not left in the conversation
    driver.find_element(By.ID, "new").click()  # the button starts a new conversation, without the unreadable file
    choose_image(driver, EXAMPLE)  # the page still works
    driver.execute_script("document.getElementById('question').value = arguments[0]", "word " * 3000)
    ask(driver, "")  # Enter: a question over the context is the server's error, in words
    WebDriverWait(driver, WAIT_S).until(lambda d: "context" in d.find_element(By.ID, "error").text)
    ask(driver, QUESTION)
    assert wait_answered(driver, 1).find_element(By.CLASS_NAME, "text").text.strip() == "3"


def test_stop_cancels_the_generation_and_frees_the_slot(driver, endless_server):
    open_page(driver, endless_server)
    choose_image(driver, EXAMPLE)
    before = metrics(endless_server)
    ask(driver, "Tell me a long story about the shapes.")
    WebDriverWait(driver, WAIT_S).until(lambda d: answers(d) and len(answers(d)[0].find_element(By.CLASS_NAME, "text").text) > 20)
    model = (("model", "endless"),)
    assert metrics(endless_server)[("convllava_edge_busy_slots", model)] == 1
    driver.find_element(By.ID, "stop").click()
    WebDriverWait(driver, 5).until(lambda d: "stopped" in answers(d)[0].get_attribute("class"))
    deadline = time.monotonic() + 5
    while metrics(endless_server)[("convllava_edge_busy_slots", model)] != 0:
        assert time.monotonic() < deadline, "the slot is still busy 5 s after Stop"
        time.sleep(0.1)
    after = metrics(endless_server)
    generated = ("convllava_edge_generated_tokens_total", model)
    assert after.get(generated, 0) == before.get(generated, 0)  # the answer never completed: it was cancelled
    assert driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "error").text


def test_no_serious_or_critical_accessibility_violation(driver, server):
    from axe_selenium_python import Axe  # ships axe.min.js inside the package: nothing is downloaded

    open_page(driver, server)
    choose_image(driver, EXAMPLE)
    ask(driver, QUESTION)
    wait_answered(driver, 1)
    axe = Axe(driver)
    axe.inject()
    results = axe.run()
    serious = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in results["violations"]
               if v["impact"] in ("serious", "critical")]
    assert not serious, serious


def test_a_keyboard_alone_completes_a_question(driver, server):
    """Tab to each control, type, Enter: no mouse. The file chooser is the focused input given a path (what a
    person does in the system dialog that Enter opens)."""
    driver.delete_all_cookies()
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "key").is_displayed())

    def keys(*typed: str) -> None:  # to whatever has the focus, as a keyboard does
        ActionChains(driver).send_keys(*typed).perform()

    def tab_to(element_id: str, limit: int = 25) -> None:
        for _ in range(limit):
            keys(Keys.TAB)
            if driver.switch_to.active_element.get_attribute("id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("key")
    keys(KEY, Keys.ENTER)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    tab_to("file")
    driver.switch_to.active_element.send_keys(str(EXAMPLE))
    WebDriverWait(driver, WAIT_S).until(lambda d: EXAMPLE.name in d.find_element(By.ID, "image-info").text)
    tab_to("question")
    keys(QUESTION, Keys.ENTER)
    assert wait_answered(driver, 1).find_element(By.CLASS_NAME, "text").text.strip() == "3"


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_an_image_dropped_or_pasted_is_taken_like_a_picked_one(driver, server, how):
    """What the browser hands the page on a drop or a paste (a DataTransfer holding the file), dispatched as
    those events: the page shows the image and answers about it."""
    open_page(driver, server)
    driver.execute_script("""
        const [how, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const event = how === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                     : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
        (how === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
    """, how, base64.b64encode(EXAMPLE.read_bytes()).decode())
    WebDriverWait(driver, WAIT_S).until(lambda d: "36 image tokens" in d.find_element(By.ID, "image-info").text)
    ask(driver, QUESTION)
    assert wait_answered(driver, 1).find_element(By.CLASS_NAME, "text").text.strip() == "3"
