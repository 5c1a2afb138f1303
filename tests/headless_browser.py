"""Loads an HTML file in a headless Chromium and prints, as JSON, what the browser made of it.

    python tests/headless_browser.py PAGE.html

The browser is Qt WebEngine (Chromium) from the PyQt6-WebEngine wheels, the one browser engine that
installs from PyPI alone (playwright and pyppeteer download their browsers from elsewhere at run
time). It runs offscreen in its own process, so a test that calls this script never has Qt in its
own. Output: {"loaded": bool, "title": str, "images": [{"src", "complete", "width", "height"}],
"links": [href, ...]}, widths and heights the decoded (natural) sizes, 0 for an image that failed.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QTWEBENGINE_DISABLE_SANDBOX", "1")  # Chromium's sandbox refuses root (CI, containers)
os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--disable-gpu")

from PyQt6.QtCore import QTimer, QUrl  # pylint: disable=wrong-import-position
from PyQt6.QtWebEngineWidgets import QWebEngineView  # pylint: disable=wrong-import-position
from PyQt6.QtWidgets import QApplication  # pylint: disable=wrong-import-position

# Run once the load event fired: every <img> has then either decoded or failed.
_INSPECT = """JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                width: i.naturalWidth, height: i.naturalHeight})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))})"""


def inspect(page: str, timeout_s: float) -> dict:
  app = QApplication([sys.argv[0]])
  view = QWebEngineView()
  result = {"loaded": False}

  def finish(report: str) -> None:
    result.update(json.loads(report))
    app.quit()

  def loaded(ok: bool) -> None:
    result["loaded"] = ok
    view.page().runJavaScript(_INSPECT, finish)

  view.loadFinished.connect(loaded)
  view.load(QUrl.fromLocalFile(os.path.abspath(page)))
  QTimer.singleShot(int(timeout_s * 1000), app.quit)
  app.exec()
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("page")
  parser.add_argument("--timeout_s", type=float, default=60.0)
  args = parser.parse_args()
  print(json.dumps(inspect(args.page, args.timeout_s)))


if __name__ == "__main__":
  main()
