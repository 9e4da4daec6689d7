"""The GPU check's summaries: one line per failure, and the JSON and Markdown files (scripts/gpu_check.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt|Warning)\b.*|^error: .*")
_API_ERRORS = ("AttributeError", "TypeError", "ImportError", "ModuleNotFoundError", "NotImplementedError")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(text).split("+")[0])[:3])


def failure_line(result, what: str, env: dict) -> str:
    """One line saying why a part failed: its time limit, or the last error line of its output."""
    if result.timed_out:
        return f"{what}: stopped at its time limit after {result.seconds:.0f}s"
    # pytest prefixes exception lines with "E   "
    lines = [re.sub(r"^E\s+", "", ln.strip()) for ln in (result.stderr + "\n" + result.stdout).splitlines()
             if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and "Warning" not in ln.split(":")[0]]
    line = errors[-1] if errors else (lines[-1] if lines else "no output")
    text = f"{what} exited {result.rc}: {line}"
    torch, pinned = env.get("torch"), env.get("torch_pinned")
    if torch and pinned and _version(torch) < _version(pinned) and line.startswith(_API_ERRORS):
        text += f" (torch {torch} here, {pinned} pinned: this may need the newer torch)"
    return text[:400]


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _figures(figures: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items() if v is not None)


def render_markdown(summary: dict) -> str:
    env = next((r["figures"] for r in summary["rows"] if r["name"] == "environment"), {})
    counts = {s: sum(r["status"] == s for r in summary["rows"]) for s in ("pass", "fail", "skipped")}
    lines = [
        f"# GPU check, {summary['date']}",
        "",
        f"device {summary['device']} ({env.get('gpu') or 'no GPU'}) · torch {env.get('torch', '?')} (pinned "
        f"{env.get('torch_pinned', '?')}) · Python {env.get('python', '?')} · profile {summary['profile']} · "
        f"{summary['total_s']:.0f} s of a {summary['budget_s']:.0f} s budget · {counts['pass']} pass, "
        f"{counts['fail']} fail, {counts['skipped']} skipped",
        "",
    ]
    lines += [f"- {n}" for n in summary.get("notes", [])]
    lines += ["", "| part | row | status | figures | detail |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        detail = str(r.get("detail", "")).replace("|", "/")
        lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {_figures(r['figures'])} | {detail} |")
    lines += ["", "| part | ran | seconds | CPU seconds | limit |", "|---|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} | {p['cpu_s']} | {p['limit_s']} |"
              for p in summary["parts"]]
    return "\n".join(lines) + "\n"


def write_summaries(summary: dict, out: Path) -> str:
    """gpu-check.json and gpu-check.md under `out`; returns the Markdown."""
    md = render_markdown(summary)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "gpu-check.md").write_text(md)
    return md
