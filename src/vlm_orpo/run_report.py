"""`report.html` of a run: one self-contained page to look at instead of reading metrics.jsonl.

It holds the results table and wall time (summary.md), the data summary (kept per split, skipped by reason), the
training curves (the PNGs train wrote, or plotted again from metrics.jsonl), what `evaluate` wrote into a folder
of the run (its table, its plot and, with `--generate`, the side-by-side generations), the run's facts (the model
card of final/ or best/: base model, data, loss, LoRA, steps, command, versions) and config.yaml when there is one.
Images are inlined as data: URLs, the style is inline, and a Content-Security-Policy forbids the page (and the
generations frame) any other load. Every text is escaped; the generations page, which holds model answers, is
shown in a sandboxed frame (no scripts). The page is built from the run's files alone, so it can be written again
at any time: `python -m vlm_orpo.run_report RUN_DIR [--eval DIR]`.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
import tempfile
from pathlib import Path

from vlm_orpo.run_dir import BEST, FINAL, METRICS, SUMMARY

REPORT = "report.html"
CONFIG = "config.yaml"
EVAL_FILES = ("results.md", "generations.html")  # a folder of the run holding one of these is evaluate's --out

POLICY = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">"""
# an attribute that loads a URL, up to its value, where the value is not a data: URL
_NOT_DATA_URL = re.compile(
    r"""(\s(?:src|srcset|href|xlink:href|poster|background|action|formaction|data|cite)\s*=\s*)(?!["']?\s*data:)(["']?)""",
    re.IGNORECASE)
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{policy}
<title>vlm-orpo run report: {name}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222 }}
h1 {{ font-size: 1.6em }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em }}
table {{ border-collapse: collapse; margin: .6em 0 }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right }}
th:first-child, td:first-child {{ text-align: left }}
th {{ background: #f4f4f4 }}
pre {{ background: #f6f6f6; padding: .8em; white-space: pre-wrap; overflow-wrap: anywhere }} code {{ background: #f2f2f2; padding: 0 .2em }}
.curves {{ display: flex; flex-wrap: wrap; gap: 8px }} .curves img {{ max-width: 49%; border: 1px solid #eee }}
img {{ max-width: 100% }} .note {{ color: #666 }}
iframe {{ width: 100%; height: 36em; border: 1px solid #ccc; resize: vertical }}
</style></head>
<body>
<h1>Run report: {name}</h1>
<p class="note">{path}</p>
{sections}
</body></html>
"""


def write_report(run_dir: str | Path, eval_dir: str | Path | None = None) -> Path:
    """Write `run_dir/report.html` from the run's files (and `eval_dir`, else the run's own evaluate folders)."""
    run = Path(run_dir)
    summary = _read(run / SUMMARY)
    body, data_line = _split_summary(summary)
    card = _card(run)
    sections = [("Results", markdown(body) if body else _note(f"no {SUMMARY}: the run has not finished")),
                ("Data", _data(data_line or _card_counts(card))),
                ("Training curves", _curves(run, summary))]
    eval_dirs = [Path(eval_dir)] if eval_dir else sorted(
        p for p in run.iterdir() if p.is_dir() and any((p / f).is_file() for f in EVAL_FILES))
    sections += [(f"Evaluation: {d.name}", _evaluation(d)) for d in eval_dirs]
    if card:
        sections.append(("Run facts (model card)", markdown(card)))
    if (run / CONFIG).is_file():
        sections.append((f"Config ({CONFIG})", f"<pre>{html.escape(_read(run / CONFIG))}</pre>"))
    text = PAGE.format(policy=POLICY, name=html.escape(run.resolve().name), path=html.escape(str(run.resolve())),
                       sections="\n".join(f"<h2>{html.escape(t)}</h2>\n{s}" for t, s in sections))
    path = run / REPORT
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the sections


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _split_summary(summary: str) -> tuple[str, str]:
    """summary.md without its title and image lines, and its `data: ...` line (SkipReport.summary())."""
    lines, data = [], ""
    for line in summary.splitlines():
        if line.startswith(("# ", "![")):
            continue
        before, found, after = line.partition("data: kept ")
        if found:
            data, line = found + after, before.strip()
        lines.append(line)
    return "\n".join(lines).strip(), data


def _data(line: str) -> str:
    """`data: kept train 250, validation 16; skipped 3 (bad image: 2, empty answer: 1)` as two list items."""
    if not line:
        return _note("no data summary in this run's files")
    items = line.removeprefix("data: ").split("; ", 1)
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def _card(run: Path) -> str:
    """The body of final/'s (else best/'s) model card, without its metadata and evaluation (shown above)."""
    text = _read(run / FINAL / "README.md") or _read(run / BEST / "README.md")
    if text.startswith("---"):
        text = text.split("\n---", 1)[-1].lstrip("-\n")
    return re.sub(r"^## Evaluation\n.*?(?=^## |\Z)", "", text, flags=re.M | re.S).strip()


def _card_counts(card: str) -> str:
    found = re.search(r"^- counts: (.*)$", card, flags=re.M)
    return found.group(1) if found else ""


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _img(path: Path) -> str:
    return f"<img src='{data_url(path)}' alt='{html.escape(path.stem)}' title='{html.escape(path.name)}'>"


def _curves(run: Path, summary: str) -> str:
    """The PNGs summary.md links (train writes them); without them, plotted again from metrics.jsonl."""
    plots = [run / name for name in re.findall(r"^!\[[^\]]*\]\(([^)/]+\.png)\)$", summary, flags=re.M)]
    plots = [p for p in plots if p.is_file()]
    if plots:
        return "<div class='curves'>" + "".join(_img(p) for p in plots) + "</div>"
    if not (run / METRICS).is_file():
        return _note(f"no {METRICS} in this run")
    from vlm_orpo.config import LossConfig
    from vlm_orpo.reporting import plot_training

    loss = LossConfig()
    if (run / CONFIG).is_file():
        import yaml

        loss = LossConfig(**(yaml.safe_load(_read(run / CONFIG)) or {}).get("loss", {}))
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_training(run / METRICS, Path(tmp), loss)
        return "<div class='curves'>" + "".join(_img(p) for p in plots) + "</div>"


def _evaluation(folder: Path) -> str:
    """evaluate's table and plot, and its generations page in a sandboxed frame (model answers are untrusted)."""
    parts = [markdown(_read(folder / "results.md"))] if (folder / "results.md").is_file() else []
    if (folder / "results.png").is_file():
        parts.append(_img(folder / "results.png"))
    if (folder / "generations.html").is_file():
        # the frame's document carries the policy from its first byte, not only by inheritance from this page; and
        # every URL in it that is not data: is made one before the frame parses it, as the policy would refuse it
        # anyway: Chromium sometimes starts fetching a frame's image before its meta policy applies (about one
        # test run in four saw a remote and a relative image attempted)
        page = POLICY + _NOT_DATA_URL.sub(r"\1\2data:,", _read(folder / "generations.html"))
        parts.append(f"<h3>Greedy generations, side by side</h3><iframe sandbox title='generations' "
                     f"srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")
    return "\n".join(parts) or _note(f"nothing of evaluate's in {folder}")


# ---------------------------------------------------------------- the markdown our own files use


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]
    head, *rest = rows
    cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def markdown(text: str) -> str:
    """Headings, paragraphs, bullet lists, pipe tables and code fences: what summary.md, results.md and our model
    cards hold. Every text is escaped; links stay text; image lines are dropped (images are inlined elsewhere)."""
    out, block, kind, code = [], [], None, None
    for line in [*text.splitlines(), ""]:
        if code is not None:
            if line.startswith("```"):
                out.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
                code = None
            else:
                code.append(line)
            continue
        new_kind = "table" if line.startswith("|") else "list" if line.startswith("- ") else None
        if block and new_kind != kind:
            out.append(_table(block) if kind == "table" else
                       "<ul>" + "".join(f"<li>{_inline(item[2:])}</li>" for item in block) + "</ul>")
            block = []
        kind = new_kind
        if kind:
            block.append(line)
        elif line.startswith("```"):
            code = []
        elif line.startswith("#"):
            hashes, _, title = line.partition(" ")
            level = min(len(hashes) + 2, 6)
            out.append(f"<h{level}>{_inline(title)}</h{level}>")
        elif line.strip() and not line.startswith("!["):
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm_orpo.run_report", description="write RUN_DIR/report.html")
    parser.add_argument("run_dir")
    parser.add_argument("--eval", help="evaluate's --out folder (default: the run's folders that hold its files)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir, args.eval))


if __name__ == "__main__":
    main()
