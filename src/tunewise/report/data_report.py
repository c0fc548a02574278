"""data/report.html: what the data stage read, rejected, removed and kept, with statistics."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from tunewise.report.plots import bar_plot, histogram_plot
from tunewise.runs import atomic_write_text

STEPS = ("read", "rejected", "too_long", "exact_duplicates", "near_duplicates", "semantic_duplicates",
         "sampled_out", "contaminated", "train", "val", "test")


def write_data_report(prepared, manifest: dict, path: Path, *, preview: list[str]) -> None:
    """Render the report; `prepared` is a data.prepare.Prepared, `preview` the first rows as trained."""
    counts = {k: manifest["counts"][k] for k in STEPS if k in manifest["counts"]}
    tokens = manifest["stats"].get("tokens")
    balance = manifest["stats"].get("label_balance")
    env = Environment(loader=PackageLoader("tunewise.report", "templates"), autoescape=select_autoescape())
    html = env.get_template("data_report.html").render(
        manifest=manifest,
        counts=counts,
        counts_png=bar_plot(counts, xlabel="examples at each step"),
        tokens=tokens,
        tokens_png=histogram_plot(prepared.lengths, xlabel="tokens under the chat template",
                                  limit=tokens.get("max_seq_len")) if tokens else None,
        balance=balance,
        balance_png=bar_plot(balance["counts"], xlabel="training examples per label") if balance else None,
        problems=prepared.problems,
        preview=preview,
    )
    atomic_write_text(path, html)
