"""A self-contained HTML page showing extractions in their text (inline CSS, no external assets).

Input: JSONL rows as the evaluate stage writes them (``{id, text, answers, gold, pred}``) or as
``chatuie extract`` writes them (``{id, text, entities, relations, events, ...}``).

Every entity, event trigger and event argument is highlighted in its text, one colour per label.
When a row has ``gold``, spans are compared by (kind, label, start, end):

* ``correct``  predicted and gold: filled, solid outline;
* ``missed``   gold only: no fill, dashed outline;
* ``spurious`` predicted only: red fill and outline, struck through.

Overlapping spans are drawn nested; a span crossing another is drawn in pieces that share its
``data-span`` id. Relations and events are listed under each text with the same statuses.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.errors import ChatuieError

STATUSES = ("correct", "missed", "spurious")


class ViewError(ChatuieError, ValueError):
    """A malformed input row, located as ``file:line: field: what is wrong``."""


@dataclass(frozen=True)
class Mark:
    """One highlighted span. ``key`` identifies it for gold/pred comparison."""

    kind: str  # entity | trigger | argument
    label: str  # entity type, event type, or role
    start: int
    end: int
    status: str  # correct | missed | spurious | pred
    note: str = ""  # extra hover text (an argument's event)

    @property
    def key(self) -> tuple[str, str, int, int, str]:
        return (self.kind, self.label, self.start, self.end, self.note)


@dataclass
class Row:
    id: str
    text: str
    pred: dict[str, list]
    gold: dict[str, list] | None
    answers: list[str]
    source: str


# ----------------------------------------------------------------------------------------------
# input


def _check_span(span: Any, text: str, where: str) -> tuple[int, int]:
    if not isinstance(span, dict):
        raise ViewError(f"{where}: expected an object with start/end")
    start, end = span.get("start"), span.get("end")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise ViewError(f"{where}: start/end must be integers")
    if not 0 <= start < end <= len(text):
        raise ViewError(f"{where}: span [{start}, {end}) outside the text (length {len(text)})")
    if "text" in span and span["text"] != text[start:end]:
        raise ViewError(f"{where}: span text {span['text']!r} != text[{start}:{end}] {text[start:end]!r}")
    return start, end


def _structure(value: Any, text: str, where: str) -> dict[str, list]:
    if not isinstance(value, dict):
        raise ViewError(f"{where}: expected an object with entities/relations/events")
    out: dict[str, list] = {}
    for key in ("entities", "relations", "events"):
        items = value.get(key, [])
        if not isinstance(items, list):
            raise ViewError(f"{where}.{key}: expected a list")
        for i, item in enumerate(items):
            at = f"{where}.{key}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise ViewError(f"{at}: expected an object with a string 'type'")
            if key == "entities":
                _check_span(item, text, at)
            elif key == "relations":
                _check_span(item.get("head"), text, f"{at}.head")
                _check_span(item.get("tail"), text, f"{at}.tail")
            else:
                _check_span(item.get("trigger"), text, f"{at}.trigger")
                arguments = item.get("arguments", [])
                if not isinstance(arguments, list):
                    raise ViewError(f"{at}.arguments: expected a list")
                for j, arg in enumerate(arguments):
                    _check_span(arg, text, f"{at}.arguments[{j}]")
                    if not isinstance(arg.get("role"), str):
                        raise ViewError(f"{at}.arguments[{j}].role: expected a string")
        out[key] = items
    return out


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a predictions / extract JSONL file, validated (errors name file:line: field)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as err:
        raise ViewError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ViewError(f"{path}: not UTF-8 text") from None
    rows: list[Row] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ViewError(f"{where}: invalid JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise ViewError(f"{where}: expected a JSON object")
        text = data.get("text")
        if not isinstance(text, str):
            raise ViewError(f"{where}: text: expected a string")
        pred_raw = data.get("pred", data)  # extract output: top-level keys
        pred = _structure(pred_raw, text, f"{where}: pred" if "pred" in data else where)
        gold = _structure(data["gold"], text, f"{where}: gold") if data.get("gold") is not None else None
        answers = data.get("answers") or []
        answers = [a for a in answers if isinstance(a, str)] if isinstance(answers, list) else []
        rows.append(Row(str(data.get("id", lineno)), text, pred, gold, answers, f"{path.name}:{lineno}"))
    return rows


# ----------------------------------------------------------------------------------------------
# comparison


def _marks_of(structure: dict[str, list]) -> list[tuple[str, str, int, int, str]]:
    keys = []
    for e in structure.get("entities", []):
        keys.append(("entity", e["type"], e["start"], e["end"], ""))
    for ev in structure.get("events", []):
        t = ev["trigger"]
        keys.append(("trigger", ev["type"], t["start"], t["end"], ""))
        for a in ev.get("arguments", []):
            keys.append(("argument", a["role"], a["start"], a["end"], ev["type"]))
    return keys


def compare_marks(pred: dict[str, list], gold: dict[str, list] | None) -> list[Mark]:
    """Every span to draw, with its status (``pred`` everywhere when there is no gold)."""
    pred_keys = list(dict.fromkeys(_marks_of(pred)))
    if gold is None:
        return [Mark(*k[:4], status="pred", note=k[4]) for k in pred_keys]
    gold_keys = list(dict.fromkeys(_marks_of(gold)))
    gold_set, pred_set = set(gold_keys), set(pred_keys)
    marks = [Mark(*k[:4], status="correct" if k in gold_set else "spurious", note=k[4]) for k in pred_keys]
    marks += [Mark(*k[:4], status="missed", note=k[4]) for k in gold_keys if k not in pred_set]
    return marks


def _relation_key(r: dict[str, Any]) -> tuple:
    return (r["type"], r["head"]["start"], r["head"]["end"], r["tail"]["start"], r["tail"]["end"])


def _with_status(pred: list[dict], gold: list[dict] | None, key: Any) -> list[tuple[dict, str]]:
    if gold is None:
        return [(item, "pred") for item in pred]
    gold_keys = {key(g) for g in gold}
    pred_keys = {key(p) for p in pred}
    out = [(p, "correct" if key(p) in gold_keys else "spurious") for p in pred]
    return out + [(g, "missed") for g in gold if key(g) not in pred_keys]


# ----------------------------------------------------------------------------------------------
# rendering


def label_colours(labels: Iterable[str]) -> dict[str, int]:
    """A hue per label, spread by the golden angle over the sorted labels (stable per page).

    Hues stay within [30, 330): red is kept for spurious spans."""
    return {label: 30 + round(i * 137.508) % 300 for i, label in enumerate(sorted(set(labels)))}


def _style(hue: int) -> str:
    return f"--c:hsl({hue} 70% 38%);--bg:hsl({hue} 80% 50% / 0.2)"


def render_text(text: str, marks: Sequence[Mark], hues: dict[str, int], prefix: str) -> str:
    """``text`` as HTML with every mark wrapped in ``<span class="hl ...">`` (nested; a mark
    crossing another is split into pieces sharing ``data-span``)."""
    points = sorted({0, len(text)} | {m.start for m in marks} | {m.end for m in marks})
    # Outer marks first: longer spans enclose shorter ones where they can.
    order = sorted(range(len(marks)), key=lambda i: (marks[i].start, -marks[i].end, i))
    rank = {index: position for position, index in enumerate(order)}
    out: list[str] = []
    stack: list[int] = []
    for a, b in zip(points, points[1:], strict=False):
        want = sorted((i for i, m in enumerate(marks) if m.start <= a and m.end >= b), key=rank.__getitem__)
        keep = 0
        while keep < min(len(stack), len(want)) and stack[keep] == want[keep]:
            keep += 1
        for _ in range(len(stack) - keep):
            out.append("</span>")
        del stack[keep:]
        for index in want[keep:]:
            m = marks[index]
            classes = f"hl {m.kind} {m.status}" + (" cont" if a > m.start else "")
            title = f"{m.label}{' of ' + m.note if m.note else ''} [{m.start},{m.end}) {m.kind} {m.status}"
            out.append(
                f'<span class="{classes}" style="{_style(hues.get(m.label, 0))}" '
                f'data-span="{prefix}-{index}" data-label="{html.escape(m.label)}" '
                f'data-start="{m.start}" data-end="{m.end}" title="{html.escape(title)}">'
            )
            stack.append(index)
        out.append(html.escape(text[a:b]))
        for index in reversed(stack):  # label tags where marks end (inside the innermost piece)
            if marks[index].end == b:
                out.append(f'<sup class="tag">{html.escape(marks[index].label)}</sup>')
    out.extend("</span>" for _ in stack)
    return "".join(out)


def _span_html(span: dict[str, Any], hues: dict[str, int], kind: str) -> str:
    label = span.get("type") or span.get("role") or ""
    hue = hues.get(label)
    style = f' style="{_style(hue)}"' if hue is not None else ""
    tag = f'<sup class="tag">{html.escape(label)}</sup>' if label else ""
    return f'<span class="chip {kind}"{style}>{html.escape(span["text"])}{tag}</span>'


def _relations_html(row: Row, hues: dict[str, int]) -> str:
    gold = row.gold["relations"] if row.gold is not None else None
    items = _with_status(row.pred["relations"], gold, _relation_key)
    if not items:
        return ""
    lines = []
    for r, status in items:
        lines.append(
            f'<li class="rel {status}">{_span_html(r["head"], hues, "entity")} '
            f'<span class="arrow">—{html.escape(r["type"])}→</span> '
            f'{_span_html(r["tail"], hues, "entity")} <span class="st">{status}</span></li>'
        )
    return '<div class="list"><h3>Relations</h3><ul>' + "".join(lines) + "</ul></div>"


def _events_html(row: Row, hues: dict[str, int]) -> str:
    gold = row.gold["events"] if row.gold is not None else None
    items = _with_status(
        row.pred["events"], gold, lambda e: (e["type"], e["trigger"]["start"], e["trigger"]["end"])
    )
    if not items:
        return ""
    lines = []
    for ev, status in items:
        args = ", ".join(
            f"{html.escape(a['role'])}: {_span_html(a, hues, 'argument')}" for a in ev.get("arguments", [])
        )
        trigger = _span_html({**ev["trigger"], "type": ev["type"]}, hues, "trigger")
        lines.append(
            f'<li class="event {status}"><b>{html.escape(ev["type"])}</b> trigger {trigger}'
            f'{" — " + args if args else ""} <span class="st">{status}</span></li>'
        )
    return '<div class="list"><h3>Events</h3><ul>' + "".join(lines) + "</ul></div>"


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;
 margin:24px auto;max-width:1100px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:15px;margin:0 0 6px;color:#444}
h3{font-size:13px;margin:8px 0 2px;color:#555}
.meta{color:#666;font-size:13px}
.legend{display:flex;flex-wrap:wrap;gap:8px;margin:12px 0;font-size:13px}
.rec{border:1px solid #ddd;border-radius:8px;padding:10px 14px;margin:12px 0;background:#fff}
.rec.clean{border-left:4px solid #3a3} .rec.errors{border-left:4px solid #d33}
.text{white-space:pre-wrap;line-height:2.3;margin:4px 0;font-size:16px}
.hl{background:var(--bg);border-bottom:2px solid var(--c);border-radius:3px;padding:1px 1px}
.hl .hl{padding:2px 1px}
.hl.trigger{border:2px solid var(--c);font-weight:600}
.hl.argument{border-bottom:3px double var(--c)}
.hl.correct{outline:1.5px solid var(--c)}
.hl.missed{background:transparent;outline:2px dashed var(--c);border-bottom-color:transparent}
.hl.spurious{background:#fdd;outline:2px solid #d22;text-decoration:line-through 2px #d22}
.tag{font-size:10px;font-weight:600;color:var(--c);margin-left:1px;text-decoration:none;
 display:inline-block}
.spurious>.tag{color:#d22}
.chip{background:var(--bg,#eee);border-radius:3px;padding:0 3px;border-bottom:2px solid var(--c,#999)}
.list ul{margin:0;padding-left:20px;font-size:14px} .list li{margin:2px 0}
li.missed{opacity:.85} li.missed .st{color:#a60} li.spurious .st{color:#d22}
li.spurious>.chip,li.spurious>b{text-decoration:line-through #d22}
li.correct .st{color:#282} .st{font-size:11px;text-transform:uppercase;letter-spacing:.04em}
.arrow{color:#555;font-size:13px}
table.summary{border-collapse:collapse;font-size:13px;margin:8px 0}
table.summary td,table.summary th{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.summary td:first-child,table.summary th:first-child{text-align:left}
details{font-size:12px;color:#555} details pre{white-space:pre-wrap;word-break:break-all}
.sample{display:inline-block;padding:0 6px}
"""


def _legend(hues: dict[str, int], has_gold: bool) -> str:
    parts = []
    if has_gold:
        parts += [
            '<span class="hl entity correct sample" style="--c:#555;--bg:#ddd">correct</span>',
            '<span class="hl entity missed sample" style="--c:#555">missed (gold only)</span>',
            '<span class="hl entity spurious sample" style="--c:#555">spurious (predicted only)</span>',
        ]
    parts += [
        '<span class="hl trigger pred sample" style="--c:#555;--bg:#eee">event trigger</span>',
        '<span class="hl argument pred sample" style="--c:#555;--bg:#eee">event argument</span>',
    ]
    parts += [
        f'<span class="hl entity pred sample" style="{_style(h)}">{html.escape(label)}</span>'
        for label, h in hues.items()
    ]
    return '<div class="legend">' + "".join(parts) + "</div>"


def _summary(rows: Sequence[Row], all_marks: Sequence[list[Mark]]) -> str:
    counts: dict[tuple[str, str], Counter[str]] = {}
    for marks in all_marks:
        for m in marks:
            counts.setdefault((m.kind, m.label), Counter())[m.status] += 1
    if not counts:
        return "<p class='meta'>No spans.</p>"
    has_gold = any(r.gold is not None for r in rows)
    head = "<tr><th>kind</th><th>label</th>" + (
        "<th>correct</th><th>missed</th><th>spurious</th><th>P</th><th>R</th><th>F1</th>"
        if has_gold
        else "<th>predicted</th>"
    )
    body = []
    for (kind, label), c in sorted(counts.items()):
        cells = f"<td>{kind}</td><td>{html.escape(label)}</td>"
        if has_gold:
            tp, fn, fp = c["correct"], c["missed"], c["spurious"]
            p = tp / (tp + fp) if tp + fp else 0.0
            r = tp / (tp + fn) if tp + fn else 0.0
            f = 2 * p * r / (p + r) if p + r else 0.0
            cells += (
                f"<td>{tp}</td><td>{fn}</td><td>{fp}</td><td>{p:.2f}</td><td>{r:.2f}</td><td>{f:.2f}</td>"
            )
        else:
            cells += f"<td>{c['pred']}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="summary">{head}</tr>{"".join(body)}</table>'


def render_html(rows: Sequence[Row], title: str = "ChatUIE extractions") -> str:
    """The whole page (one string, no external references)."""
    all_marks = [compare_marks(r.pred, r.gold) for r in rows]
    labels = [m.label for marks in all_marks for m in marks]
    for r in rows:
        for structure in (r.pred, r.gold or {}):
            labels += [x["type"] for x in structure.get("events", [])]
    hues = label_colours(labels)
    has_gold = any(r.gold is not None for r in rows)
    sections = []
    for n, (row, marks) in enumerate(zip(rows, all_marks, strict=True)):
        statuses = Counter(m.status for m in marks)
        state = ""
        if row.gold is not None:
            state = "errors" if statuses["missed"] or statuses["spurious"] else "clean"
        counts = ", ".join(f"{statuses[s]} {s}" for s in (*STATUSES, "pred") if statuses[s])
        answers = ""
        if row.answers:
            raw = "\n".join(html.escape(a) for a in row.answers)
            answers = (
                f"<details><summary>raw answers ({len(row.answers)})</summary><pre>{raw}</pre></details>"
            )
        sections.append(
            f'<section class="rec {state}" id="rec-{n}" data-id="{html.escape(row.id)}">'
            f"<h2>{html.escape(row.id)} <span class='meta'>{html.escape(row.source)}"
            f"{' · ' + counts if counts else ''}</span></h2>"
            f'<div class="text">{render_text(row.text, marks, hues, f"r{n}")}</div>'
            f"{_relations_html(row, hues)}{_events_html(row, hues)}{answers}</section>"
        )
    total = Counter(m.status for marks in all_marks for m in marks)
    stats = ", ".join(f"{total[s]} {s}" for s in (*STATUSES, "pred") if total[s])
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>{len(rows)} records · {stats or 'no spans'}"
        f"{' · gold compared' if has_gold else ''}</p>"
        f"{_legend(hues, has_gold)}{_summary(rows, all_marks)}{''.join(sections)}</body></html>\n"
    )


def write_view(
    inputs: Sequence[str | Path], out: str | Path, *, title: str | None = None, limit: int = 0
) -> int:
    """Render input files into ``out`` (atomically); returns the number of records shown."""
    from chatuie.io import atomic_open

    rows: list[Row] = []
    for path in inputs:
        rows.extend(load_rows(path))
    if limit:
        rows = rows[:limit]
    page = render_html(rows, title or ", ".join(Path(p).name for p in inputs))
    with atomic_open(out) as handle:
        handle.write(page)
    return len(rows)
