"""LlamaBoard (``llamafactory-cli webui``) in a real headless browser: a user fills the Train tab
(model path, dataset, MacDrop keys in "Extra arguments"), presses Start, and sees a 2-step MacDrop
run finish, with macdrop_p in the running log LlamaBoard shows; the run's locator JSON and
trainer_log.jsonl are read back from its output folder.

Runs through `make webui-test` (Debian's chromium + chromium-driver, gradio, selenium; see
docs/install.md); tests/conftest.py leaves this folder out of `make test`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from helpers import tiny  # noqa: E402

BIN = Path(sys.executable).parent
CHROMIUM, DRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)
REQUIRED = os.environ.get("MACDROP_WEBUI_TEST") == "1"  # set by `make webui-test`: nothing may be skipped
if not REQUIRED:
    pytest.importorskip("gradio")
    pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (make webui-test checks for them)", allow_module_level=True
        )
__import__("gradio")  # LlamaBoard's extras (make webui): fail here, not in the browser
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOT = os.environ.get("MACDROP_SCREENSHOT")  # e.g. docs/img/llamaboard_macdrop.png


#: scroll the page so that the first occurrence of a text (inside LlamaBoard's one big log block) is near the top
SCROLL_TO_TEXT = """
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const at = node.textContent.indexOf(arguments[0]);
  if (at < 0) continue;
  const range = document.createRange();
  range.setStart(node, at); range.setEnd(node, at + arguments[0].length);
  window.scrollTo(0, range.getBoundingClientRect().top + window.scrollY - 120);
  return true;
}
return false;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    work = tmp_path_factory.mktemp("board")
    port = _free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    log = open(work / "webui.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "llamafactory-cli"), "webui"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                break
        except OSError:
            pass
        time.sleep(1)
        assert proc.poll() is None, (work / "webui.log").read_text()[-3000:]
    else:
        raise AssertionError("LlamaBoard did not come up: " + (work / "webui.log").read_text()[-3000:])
    yield url, work
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # a container's 64 MB /dev/shm is too small for this page
        "--window-size=1400,2200",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _textbox(driver, label):
    return driver.find_element(
        By.XPATH,
        f"//span[@data-testid='block-info' and normalize-space()='{label}']"
        "/ancestor::label[1]//*[self::textarea or self::input]",
    )


def _type(element, text):
    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)
    WebDriverWait(element.parent, 15).until(lambda _: element.get_attribute("value") == text)


def _choose(driver, label, value):
    """A gradio dropdown: type the value, pick it from the list (or keep it as a custom value)."""
    box = driver.find_element(
        By.XPATH,
        f"//input[@aria-label='{label}'] | //span[@data-testid='block-info' and "
        f"normalize-space()='{label}']/ancestor::label[1]//input",
    )
    _type(box, value)
    time.sleep(0.5)
    options = [o for o in driver.find_elements(By.CSS_SELECTOR, "ul[role='listbox'] li") if o.is_displayed()]
    exact = [o for o in options if o.get_attribute("aria-label") == value or o.text.strip() == value]
    if exact:
        exact[0].click()
    else:
        box.send_keys(Keys.ENTER)
    time.sleep(0.5)


def test_a_macdrop_run_started_from_llamaboard(board, browser, tmp_path_factory):
    url, work = board
    model = tiny.build_planted_llama(tmp_path_factory.mktemp("model"))
    data = tiny.write_datasets(tmp_path_factory.mktemp("data"))
    out = work / "macdrop_run"
    driver = browser
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Start']"))

    _choose(driver, "Model name", "Custom")
    _type(_textbox(driver, "Model path"), str(model))
    _choose(driver, "Chat template", "default")
    _type(_textbox(driver, "Data dir"), str(data))
    _textbox(driver, "Data dir").send_keys(Keys.TAB)
    time.sleep(1.5)
    _choose(driver, "Dataset", "tiny_sft")
    driver.find_element(By.XPATH, "//button[contains(normalize-space(), 'Extra configurations')]").click()
    time.sleep(0.5)
    extra = {
        "macdrop": True,
        "macdrop_k": 3,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "preprocessing_num_workers": 1,
        "report_to": "none",
        "optim": "adamw_torch",
        "save_strategy": "no",
        "bf16": False,
        "logging_steps": 1,
    }  # Compute type bf16 (the default) needs a GPU
    _type(_textbox(driver, "Extra arguments"), json.dumps(extra))
    _choose(driver, "Output dir", str(out))
    # a late change event (Model name -> Custom refills the path and template) must not have won
    time.sleep(2)
    assert _textbox(driver, "Model path").get_attribute("value") == str(model)
    assert _textbox(driver, "Data dir").get_attribute("value") == str(data)
    assert json.loads(_textbox(driver, "Extra arguments").get_attribute("value")) == extra
    driver.find_element(By.XPATH, "//button[normalize-space()='Start']").click()

    deadline = time.time() + 420
    while time.time() < deadline and not (out / "trainer_state.json").exists():
        if "Failed." in driver.find_element(By.TAG_NAME, "body").text:  # LlamaBoard's alert for a failed run
            break
        time.sleep(2)
    assert (out / "trainer_state.json").exists(), "the run did not finish: " + "\n".join(
        p.read_text()[-2000:] for p in (out / "running_log.txt", work / "webui.log") if p.exists()
    )
    # LlamaBoard polls the running log every few seconds: wait until the plugin's step line is on the
    # page (the loss plot's "macdrop_p" legend can come first, so waiting for that word is a race)
    deadline = time.time() + 90
    while time.time() < deadline and "step 1: macdrop_p" not in driver.find_element(By.TAG_NAME, "body").text:
        time.sleep(2)
    page = driver.find_element(By.TAG_NAME, "body").text
    if SCREENSHOT:  # the loss plot with macdrop_p below Start, then the log box at the plugin's lines
        driver.execute_script(
            "arguments[0].scrollIntoView();", driver.find_element(By.XPATH, "//button[normalize-space()='Start']")
        )
        time.sleep(1)
        driver.save_screenshot(SCREENSHOT)
        driver.execute_script(SCROLL_TO_TEXT, "MacDrop locator")
        time.sleep(1)
        driver.save_screenshot(SCREENSHOT.replace(".png", "_log.png"))

    located = json.loads((out / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES[:3])
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    p = {e["current_steps"]: e["macdrop_p"] for e in logged if "macdrop_p" in e}
    assert p == pytest.approx({1: 0.8 * (1 - 1 / 2), 2: 0.0})
    assert "step 1: macdrop_p 0.4000" in page, page[-3000:]
    assert "massive layer: 1" in page, page[-3000:]
    import yaml

    saved = yaml.safe_load((out / "training_args.yaml").read_text())  # what LlamaBoard handed llamafactory-cli train
    assert (saved["model_name_or_path"], saved["dataset"], saved["macdrop"], saved["macdrop_k"]) == (
        str(model),
        "tiny_sft",
        True,
        3,
    )
