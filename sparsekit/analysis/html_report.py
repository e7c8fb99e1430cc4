"""Self-contained HTML reports: every image inline as a base64 PNG, every data string escaped.

Builders return HTML fragments (str); only ``page`` assembles a document. Text that comes from data
(names, numbers, claims) goes through ``text``/``table``, which escape it; markup passes only
through the builders here, so no data string can inject markup.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child, td.text { text-align: left; }
img { max-width: 100%; image-rendering: pixelated; }
.held { color: #17663a; font-weight: bold; } .not-held { color: #a11; font-weight: bold; }
.undecided { color: #8a6d00; font-weight: bold; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
"""


def text(value) -> str:
    """Any value as escaped text (floats to 4 significant digits)."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return html.escape("" if value is None else str(value), quote=True)


def paragraph(value) -> str:
    return f"<p>{text(value)}</p>"


def heading(value, level: int = 2) -> str:
    return f"<h{level}>{text(value)}</h{level}>"


def table(headers: list, rows: list[list], css_class: dict | None = None) -> str:
    """An HTML table of escaped cells; css_class maps a cell's exact text to a class for that cell."""
    css_class = css_class or {}

    def cell(tag: str, value) -> str:
        escaped = text(value)
        classes = " ".join(c for c in (css_class.get(escaped), "text" if isinstance(value, str) else None) if c)
        return f"<{tag} class=\"{classes}\">{escaped}</{tag}>" if classes else f"<{tag}>{escaped}</{tag}>"

    head = "".join(cell("th", h) for h in headers)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(png: bytes) -> str:
    if not png.startswith(b"\x89PNG"):
        raise ValueError("png must be PNG bytes (they start with \\x89PNG)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(png: bytes, caption=None, alt: str = "") -> str:
    """A figure holding the PNG inline, with an escaped caption."""
    caption_html = f"<figcaption>{text(caption)}</figcaption>" if caption is not None else ""
    return f"<figure><img src=\"{png_data_uri(png)}\" alt=\"{text(alt)}\">{caption_html}</figure>"


def array_png(pixels: np.ndarray, cmap: str = "gray", vmin=None, vmax=None) -> bytes:
    """A 2-D array [H, W] -> PNG bytes, one pixel per entry (no axes)."""
    from matplotlib.image import imsave
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D [H, W], got shape {pixels.shape}")
    buffer = io.BytesIO()
    imsave(buffer, pixels, cmap=cmap, vmin=vmin, vmax=vmax, format="png")
    return buffer.getvalue()


def page(title, sections: list[str]) -> str:
    """The whole document: escaped title, inline style, the fragments in order."""
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{text(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{text(title)}</h1>\n{body}\n</body></html>\n")
