"""The report: sections of paragraphs, tables and figures, written as Markdown, HTML and JSON.

One document model (``Section`` holding ``Table``, ``Figure`` and paragraph blocks) renders to both
``report.md`` (figures as relative PNG links) and ``report.html`` (self-contained: figures embedded
as data URIs, inline CSS, no external resources). The figures are drawn with matplotlib's Agg
backend, so no display is needed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from duomodal.files import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    file: str  # PNG path relative to the report directory
    caption: str


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)  # str = a paragraph (Markdown-light)

    def text(self, paragraph: str) -> None:
        self.blocks.append(paragraph)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
        self.blocks.append(Table(tuple(header), tuple(tuple(str(c) for c in r) for r in rows), caption))

    def figure(self, file: str, caption: str) -> None:
        self.blocks.append(Figure(file, caption))


# --- formatting helpers -----------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3, unit: str = "") -> str:
    """A number for a table cell; n/a for None or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def fmt_accuracy(entry: dict[str, Any] | None) -> str:
    """An accuracy dict ({"accuracy", "correct", "count"}) as "62.5% (5/8)"."""
    if not entry or entry.get("accuracy") is None:
        if entry and "reason" in entry:
            return f"not measured ({entry['reason']})"
        return "n/a (0 samples)"
    return f"{100 * entry['accuracy']:.1f}% ({entry['correct']}/{entry['count']})"


# --- Markdown -------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---" for _ in block.header) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.file})")
                lines += ["", f"*{block.caption}*"]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- HTML -----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; background: #fafafa; line-height: 1.5; }
h1 { font-size: 1.8rem; border-bottom: 3px solid #1e88e5; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; color: #0d47a1; }
section { background: #fff; border-radius: 10px; padding: .4rem 1.4rem 1rem; margin: 1.2rem 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.12); }
table { border-collapse: collapse; margin: .8rem 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e0e0e0; padding: .3rem .8rem; text-align: left; }
th { background: #f1f5fb; }
caption { caption-side: top; text-align: left; font-style: italic; color: #555; padding: .2rem 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #e0e0e0; }
figcaption { color: #555; font-size: .9rem; }
code { background: #f1f1f1; padding: 0 .25rem; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Escape text; render `code` and **bold** spans."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html(title: str, sections: Sequence[Section], report_dir: Path) -> str:
    """Self-contained HTML: figures are read from `report_dir` and embedded."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table>")
                if block.caption:
                    parts.append(f"<caption>{_inline(block.caption)}</caption>")
                parts.append("<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header) + "</tr>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif isinstance(block, Figure):
                source = _data_uri(report_dir / block.file) or html.escape(block.file)
                parts.append(
                    f'<figure><img src="{source}" alt="{html.escape(block.caption)}">'
                    f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p>{_inline(block)}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) with None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report_dir: Path, title: str, sections: Sequence[Section], metrics: dict[str, Any]) -> dict[str, Path]:
    """Write report.md, report.html and metrics.json into `report_dir` (figures must be there already)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": report_dir / "report.md",
        "html": report_dir / "report.html",
        "metrics": report_dir / "metrics.json",
    }
    atomic_write_text(paths["markdown"], render_markdown(title, sections))
    atomic_write_text(paths["html"], render_html(title, sections, report_dir))
    atomic_write_text(paths["metrics"], json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n")
    return paths


# --- figures --------------------------------------------------------------------------------------


def _pyplot():
    # matplotlib loads here, when a figure is drawn: importing it costs a second that the rest does not need
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after choosing the Agg backend, lazily as above

    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_image_rows(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    path: Path,
    cell_titles: Sequence[Sequence[str]] | None = None,
    cell_inches: float = 1.1,
) -> Path:
    """A grid with one labelled row per entry: (row label, images). Optional title per cell.

    Drawn with PIL at 100 pixels per inch (images scaled nearest-neighbour, so pixels stay sharp; Pillow's
    own font): a matplotlib axes per cell made a report's figures take most of its time."""
    if not rows:
        raise ValueError("no rows to draw; pass at least one (label, images) row")
    columns = max(1, max(len(images) for _, images in rows))
    cell, gap, label_width = round(cell_inches * 100), 6, 240  # pixels
    title = 14 if cell_titles is not None else 0  # pixels above each cell for its title
    pitch_x, pitch_y = cell + gap, cell + title + gap
    grid = Image.new("RGB", (label_width + columns * pitch_x, len(rows) * pitch_y + gap), "white")
    draw = ImageDraw.Draw(grid)
    label_font, title_font = ImageFont.load_default(size=11), ImageFont.load_default(size=10)
    for r, (label, images) in enumerate(rows):
        top = r * pitch_y + title + gap  # the row's images start here
        draw.multiline_text((label_width - 8, top + cell / 2), label, fill="black", font=label_font, anchor="rm",
                            align="right")
        for c, image in enumerate(images):
            left = label_width + c * pitch_x
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (left, top))
            if cell_titles is not None and c < len(cell_titles[r]):
                draw.text((left + cell / 2, top - 2), cell_titles[r][c], fill="black", font=title_font, anchor="md")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


_NOT_CURVES = {"step", "epoch", "time", "elapsed", "elapsed_s", "wall_time", "timestamp", "dropped",
               "items_per_s", "split"}


def read_metrics_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines of a metrics.jsonl that parse as objects, and how many lines did not."""
    entries, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(item, dict):
            entries.append(item)
        else:
            bad += 1
    return entries, bad


def curve_series(entries: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (steps, values) for every numeric field logged with a step (bools excluded).

    Rows with a "split" field ("train", "val") name their series "<split> <field>".
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, entry in enumerate(entries):
        step = entry.get("step", i)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        split = entry.get("split")
        prefix = f"{split} " if isinstance(split, str) and split else ""
        for key, value in entry.items():
            if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = series.setdefault(prefix + key, ([], []))
            xs.append(float(step))
            ys.append(float(value))
    return series


def plot_training_curves(metrics_log: Path, path: Path, title: str, max_panels: int = 6) -> list[str]:
    """Draw the run's curves: every *loss* series in the first panel, other series in their own.

    Returns the names of the series drawn (empty when the log holds none, and then nothing is drawn).
    """
    entries, _ = read_metrics_log(metrics_log)
    series = curve_series(entries)
    if not series:
        return []
    loss_keys = sorted(k for k in series if k.endswith("loss"))
    # validation figures first (they say most), then the rest (lr, grad_norm, component losses)
    other_keys = sorted((k for k in series if not k.endswith("loss")), key=lambda k: (not k.startswith("val"), k))
    panels: list[list[str]] = ([loss_keys] if loss_keys else []) + [[k] for k in other_keys]
    panels = panels[:max_panels]
    plt = _pyplot()
    columns = min(3, len(panels))
    n_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 3.0 * n_rows), squeeze=False,
                             layout="constrained")
    drawn: list[str] = []
    try:
        for index, keys in enumerate(panels):
            ax = axes[index // columns][index % columns]
            for key in keys:
                xs, ys = series[key]
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
                drawn.append(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=7)
            else:
                ax.set_title(keys[0], fontsize=9)
        for index in range(len(panels), n_rows * columns):
            axes[index // columns][index % columns].axis("off")
        fig.suptitle(title, fontsize=10)
        _save_figure(fig, path)
    finally:
        plt.close(fig)
    return drawn
