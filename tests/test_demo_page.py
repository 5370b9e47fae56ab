"""The playground page at GET /, driven in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by `make browser`) through selenium, against a real server on 127.0.0.1.

The page must stream: a MutationObserver installed before the click records every state of the output element,
and the states must grow through at least two distinct non-empty prefixes before the final text, which must
equal the non-streamed greedy answer of the official openai client for the same request.
"""

from __future__ import annotations

import re
import shutil

import httpx
import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from lorafleet.serving.app import create_app
from lorafleet.serving.server import ServerThread
from tests.helpers import BASE_ID, tiny_serving_config, two_adapters

PROMPT = "Tell me about the sea"
MAX_TOKENS = 48
RECORD_OUTPUT = """
window.__states = [];
new MutationObserver(() => window.__states.push(document.getElementById("output").textContent))
  .observe(document.getElementById("output"), {childList: true, characterData: true, subtree: true});
"""


def _browser_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise RuntimeError(
            "Chromium and its WebDriver are needed for this test: run `make browser` "
            "(apt-get install chromium chromium-driver)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return two_adapters(tiny_model_dir, tmp_path_factory.mktemp("demo-adapters"))


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir):
    with ServerThread(create_app(tiny_serving_config(tiny_model_dir, adapter_dir))) as running:
        yield running


def _wait(browser, condition, timeout=30):
    return WebDriverWait(browser, timeout).until(lambda _: condition())


def _model_options(browser) -> list[str]:
    select = browser.find_element(By.ID, "model")
    if not select.is_enabled():
        return []
    return [option.get_attribute("value") for option in Select(select).options]


def _ask(browser, model: str, prompt: str) -> str:
    """Choose `model`, type `prompt`, click Send, wait until the answer is complete; returns the output text."""
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    for field, value in (("prompt", prompt), ("max-tokens", str(MAX_TOKENS)), ("temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.execute_script(RECORD_OUTPUT)
    browser.find_element(By.ID, "send").click()
    output = browser.find_element(By.ID, "output")
    _wait(browser, lambda: output.get_attribute("data-state") in ("done", "error"), timeout=60)
    assert output.get_attribute("data-state") == "done", browser.find_element(By.ID, "status").text
    return browser.execute_script("return document.getElementById('output').textContent")


def _greedy_chat(url: str, model: str, prompt: str, api_key: str = "unused"):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0
    )


def test_page_streams_the_greedy_answer_and_shows_tokens_per_second(server, browser):
    browser.get(server.url + "/")
    _wait(browser, lambda: _model_options(browser))
    assert _model_options(browser) == [BASE_ID, "a", "b"]

    text = _ask(browser, "a", PROMPT)

    expected = _greedy_chat(server.url, "a", PROMPT)
    assert text == expected.choices[0].message.content and text
    states = browser.execute_script("return window.__states")
    growing = [state for state in dict.fromkeys(states) if state and state != text]
    assert len(growing) >= 2, f"the answer arrived in {len(growing) + 1} piece(s), not streamed: {states}"
    assert all(text.startswith(state) for state in growing), states
    assert browser.find_element(By.ID, "token-count").text == f"{expected.usage.completion_tokens} tokens"
    assert re.fullmatch(r"\d+\.\d tokens/s", browser.find_element(By.ID, "tokens-per-s").text)
    assert float(browser.find_element(By.ID, "tokens-per-s").text.split()[0]) > 0


def test_answer_depends_on_the_chosen_adapter(server, browser):
    browser.get(server.url + "/")
    _wait(browser, lambda: _model_options(browser))
    answers = {model: _ask(browser, model, PROMPT) for model in (BASE_ID, "b")}
    assert answers == {model: _greedy_chat(server.url, model, PROMPT).choices[0].message.content for model in answers}
    assert answers[BASE_ID] != answers["b"]


def test_page_loads_nothing_from_elsewhere(server, browser):
    response = httpx.get(server.url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    browser.get(server.url + "/")
    _wait(browser, lambda: _model_options(browser))
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(server.url + "/") for name in resources), resources
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_api_key_field_when_the_server_requires_one(tiny_model_dir, adapter_dir, browser):
    config = tiny_serving_config(tiny_model_dir, adapter_dir, api_key="s3cret")
    with ServerThread(create_app(config)) as secured:
        assert httpx.get(secured.url + "/").status_code == 200  # the page itself needs no key ...
        assert httpx.get(secured.url + "/v1/models").status_code == 401  # ... everything else still does
        browser.get(secured.url + "/")
        auth = browser.find_element(By.ID, "auth")
        _wait(browser, auth.is_displayed)
        assert not _model_options(browser)
        key = browser.find_element(By.ID, "api-key")
        key.send_keys("wrong")
        browser.find_element(By.ID, "connect").click()
        _wait(browser, lambda: "refused" in browser.find_element(By.ID, "status").text)
        key.clear()
        key.send_keys("s3cret")
        browser.find_element(By.ID, "connect").click()
        _wait(browser, lambda: _model_options(browser))
        text = _ask(browser, "b", PROMPT)
        assert text == _greedy_chat(secured.url, "b", PROMPT, api_key="s3cret").choices[0].message.content
