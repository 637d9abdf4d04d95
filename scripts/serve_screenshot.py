"""The search page's screenshot in docs/serve.md: a real `duomodal serve` over part of the icon dataset.

Indexes N icons of an icon dataset (those named like --include, then a spread of the others) in every colour with a trained CLIP, starts `duomodal serve`
on a free loopback port, types a query into the page with Debian's Chromium (Playwright, never a
downloaded browser) and saves the page, then prints the names of the results in their order.

    .venv/bin/python scripts/serve_screenshot.py --data work/icons-32 --clip work/runs/clip-quick \\
        --icons 90 --query "an airplane icon in blue" --out docs/img/serve.png
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subset(data: Path, icons: int, include: str, folder: Path) -> int:
    """Links in `folder` to the images (every colour) of `icons` icon names with their captions: those whose
    name contains `include`, then every k-th of the others (sorted), so the collection spans the alphabet."""
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines() if line.strip()]
    every = sorted({row["icon"] for row in rows})
    wanted = [name for name in every if include and include in name]
    others = [name for name in every if name not in wanted]
    step = max(1, len(others) // max(1, icons - len(wanted)))
    names = (wanted + others[::step])[:icons]
    chosen = [row for row in rows if row["icon"] in set(names)]
    for row in chosen:
        target = folder / Path(row["file"]).name
        target.symlink_to((data / row["file"]).resolve())
        (folder / (target.stem + ".txt")).write_text(row["caption"][0] if isinstance(row["caption"], list)
                                                     else row["caption"])
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an icon dataset (duomodal data icons)")
    parser.add_argument("--clip", type=Path, required=True, help="the CLIP run to index and search with")
    parser.add_argument("--icons", type=int, default=90, help="icon names to index, every colour of each")
    parser.add_argument("--query", default="an airplane icon in blue")
    parser.add_argument("--include", default="airplane", help="index every icon whose name contains this")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images, index = Path(tmp) / "icons", Path(tmp) / "index"
        images.mkdir()
        count = subset(args.data, args.icons, args.include, images)
        duomodal = [sys.executable, "-m", "duomodal"]
        subprocess.run([*duomodal, "index", "build", str(images), "--clip", str(args.clip), "--out", str(index),
                        "--quiet"], check=True)
        port = free_port()
        server = subprocess.Popen([*duomodal, "serve", "--index", str(index), "--clip", str(args.clip),
                                   "--host", "127.0.0.1", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        sys.exit("duomodal serve did not start")
                    time.sleep(0.3)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update"])
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(url)
                page.fill("#query", args.query)
                page.press("#query", "Enter")
                page.wait_for_selector("#results figure")
                page.wait_for_timeout(800)  # thumbnails
                names = page.eval_on_selector_all("#results figure", "cards => cards.map(c => c.title)")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"indexed {count} images ({args.icons} icons); query {args.query!r}; wrote {args.out}")
    for rank, name in enumerate(names, start=1):
        print(f"{rank:>2}. {name}")


if __name__ == "__main__":
    main()
