"""Report writing: pandas tables as CSV + Markdown, matplotlib figures, one page per study."""
from __future__ import annotations

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
