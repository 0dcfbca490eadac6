"""The chat page at ``/`` in a real headless browser (Debian's chromium driven by selenium).

Needs ``chromium``, ``chromium-driver`` (apt) and ``selenium`` (pip); skipped, saying which is
missing, otherwise. The server runs in a thread (see test_server_lifecycle) around a tiny
random-weight model slowed to about 30 steps a second, so that a reply visibly streams.
"""

import shutil
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_server_lifecycle import ControlledEngine, ThreadServer, loader  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def webdriver():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver as wd
    from selenium.webdriver.chrome.service import Service

    options = wd.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = wd.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    assert selenium
    yield driver
    driver.quit()


@pytest.fixture
def engine(tiny_checkpoint, tiny_tokenizer_path):
    from llama import Llama

    def make(max_batch_size=2):
        llama = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 512, max_batch_size, device="cpu")
        return ControlledEngine(llama.engine, delay=0.03)

    return make


def wait(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def assistant_messages(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def last_state(driver):
    """The data-state of the last reply (streaming, done, stopped, error), or None."""
    replies = assistant_messages(driver)
    return replies[-1].get_attribute("data-state") if replies else None


def send(driver, text):
    box = by_id(driver, "input")
    box.clear()
    box.send_keys(text)
    by_id(driver, "send").click()


def test_send_stream_stop_and_new_chat(webdriver, engine):
    driver = webdriver
    with ThreadServer(loader(engine())) as srv:
        driver.get(srv.url + "/")
        wait(lambda: by_id(driver, "status").text == "ready", what="the status to say ready")
        assert by_id(driver, "model").text == "tiny"
        by_id(driver, "temperature").clear()
        by_id(driver, "temperature").send_keys("0")  # greedy: a reply that cannot end early by chance

        # Send a message and watch the reply grow, piece by piece.
        send(driver, "Where does the river run?")
        reply = wait(lambda: assistant_messages(driver), what="a reply")[-1]
        assert reply.get_attribute("data-state") == "streaming" and by_id(driver, "stop").is_displayed()
        first = wait(lambda: reply.find_element("css selector", ".text").text, what="the first piece")
        wait(lambda: len(reply.find_element("css selector", ".text").text) > len(first), what="more pieces")
        assert srv.metrics()["llama_running_rows"] == 1

        # Stop it: the reply stays as it is, the slot is freed, the send button is back.
        by_id(driver, "stop").click()
        wait(lambda: reply.get_attribute("data-state") == "stopped", what="the reply to stop")
        assert "stopped" in reply.text and by_id(driver, "send").is_displayed()
        srv.wait_metric("llama_running_rows", 0)
        assert driver.execute_script("return conversation.length") == 2

        # A second message with a length limit runs to its end.
        by_id(driver, "max_tokens").send_keys("6")
        send(driver, "And then?")
        wait(lambda: len(assistant_messages(driver)) == 2 and last_state(driver) == "done", what="the second reply")
        assert "length limit" in assistant_messages(driver)[-1].text
        assert driver.execute_script("return conversation.length") == 4

        # New chat: the page and the conversation are empty again.
        by_id(driver, "new-chat").click()
        assert assistant_messages(driver) == [] and by_id(driver, "empty").is_displayed()
        assert driver.execute_script("return conversation.length") == 0
        send(driver, "Hello again")
        wait(lambda: last_state(driver) == "done", what="a reply in the new chat")


def test_busy_and_context_full_messages(webdriver, engine):
    driver = webdriver
    with ThreadServer(loader(engine(max_batch_size=1)), max_queue=0) as srv:
        driver.get(srv.url + "/")
        wait(lambda: by_id(driver, "status").text == "ready", what="ready")

        # Too long for the context: said so, and the message goes back into the input box.
        by_id(driver, "max_tokens").send_keys("100000")
        send(driver, "Hi")
        error = by_id(driver, "error")
        wait(lambda: error.is_displayed(), what="the context error")
        assert "no longer fits" in error.text and "busy" not in error.get_attribute("class")
        assert by_id(driver, "input").get_attribute("value") == "Hi" and assistant_messages(driver) == []
        by_id(driver, "max_tokens").clear()

        # Every slot taken and no room to wait: the page says the server is busy.
        body = {"prompt": "The river", "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            srv.wait_metric("llama_running_rows", 1)
            by_id(driver, "send").click()
            wait(lambda: "busy" in error.text, what="the busy message")
            assert "busy" in error.get_attribute("class")
        srv.wait_metric("llama_running_rows", 0)
        by_id(driver, "send").click()
        wait(lambda: last_state(driver) == "done", what="a reply once the server is free")
        assert not error.is_displayed()


def test_page_is_one_self_contained_file(webdriver, engine):
    with ThreadServer(loader(engine())) as srv:
        html = httpx.get(srv.url + "/").text
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html
