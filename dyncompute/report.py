"""Report writing: pandas tables as CSV + Markdown, matplotlib figures, one page per study."""
from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_write, atomic_write_text  # noqa: E402


def save_table(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def save_figure(fig, path: str | Path) -> Path:
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], floatfmt) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v, floatfmt: str) -> str:
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)


def loss_curves(curves: dict[str, pd.DataFrame], column: str = "loss", smooth: int = 20):
    """Training curves of several runs on one axis (rolling mean over ``smooth`` logged steps)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, df in curves.items():
        ax.plot(df["step"], df[column], alpha=0.25)
        ax.plot(df["step"], df[column].rolling(smooth, min_periods=1).mean(), label=name,
                color=ax.lines[-1].get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{column} (per sample, rolling mean {smooth})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def write_page(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """A Markdown page: ``sections`` are (heading, markdown body)."""
    body = [f"# {title}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text.strip(), ""]
    return atomic_write_text("\n".join(body), path)


# --------------------------------------------------------------------------- pages with tables and figures


@dataclass
class Figure:
    path: str  # relative to the page
    caption: str = ""


def write_pages(out_dir: str | Path, title: str, sections: list[tuple[str, list]], floatfmt: str = ".4g") -> dict:
    """report.md and report.html from the same sections: (heading, [text | DataFrame | Figure, ...])."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""]
    html = [f"<!doctype html><meta charset='utf-8'><title>{escape(title)}</title>", _CSS, f"<h1>{escape(title)}</h1>"]
    for heading, blocks in sections:
        md += [f"## {heading}", ""]
        html.append(f"<h2>{escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, pd.DataFrame):
                md += [markdown_table(block, floatfmt), ""]
                html.append(block.to_html(index=False, na_rep="", float_format=lambda v: format(v, floatfmt),
                                          border=0, classes="table"))
            elif isinstance(block, Figure):
                md += [f"![{Path(block.path).stem}]({block.path})", ""]
                md += [f"*{block.caption}*", ""] if block.caption else []
                html.append(f"<figure><img src='{escape(block.path)}' alt='{escape(Path(block.path).stem)}'>"
                            f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
            else:
                md += [str(block).strip(), ""]
                html.append(f"<p>{_inline(str(block).strip())}</p>")
    return {"md": atomic_write_text("\n".join(md), out_dir / "report.md"),
            "html": atomic_write_text("\n".join(html) + "\n", out_dir / "report.html")}


_CSS = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
        "text-align:right}img{max-width:100%}figcaption{font-size:13px;color:#444}code{background:#f3f3f3}</style>")


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` and **bold** spans."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text).replace("\n\n", "</p><p>")
