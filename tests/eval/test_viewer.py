"""The extraction viewer: spans in their text, gold vs predicted, self-contained HTML, rendering."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from chatuie.cli import app
from chatuie.eval.viewer import ViewError, compare_marks, load_rows, render_html, write_view

TEXT = "东方金钰将股份质押给中信证券。John Smith works for IBM."


def ent(label: str, span: str, text: str = TEXT, nth: int = 0) -> dict[str, Any]:
    start = -1
    for _ in range(nth + 1):
        start = text.index(span, start + 1)
    return {"type": label, "start": start, "end": start + len(span), "text": span}


def arg(role: str, span: str) -> dict[str, Any]:
    e = ent("x", span)
    return {"role": role, "start": e["start"], "end": e["end"], "text": span}


GOLD = {
    "entities": [ent("ORG", "东方金钰"), ent("ORG", "中信证券"), ent("PER", "John Smith"), ent("ORG", "IBM")],
    "relations": [{"type": "Work_For", "head": ent("PER", "John Smith"), "tail": ent("ORG", "IBM")}],
    "events": [
        {
            "type": "质押",
            "trigger": {k: v for k, v in ent("t", "质押").items() if k != "type"},
            "arguments": [arg("质押方", "东方金钰"), arg("质权方", "中信证券")],
        }
    ],
}
PRED = {
    # 东方金钰 right; "中信" a wrong boundary (spurious) so 中信证券 is missed; "Smith works" crosses
    # the gold "John Smith" (drawn in pieces); IBM right.
    "entities": [ent("ORG", "东方金钰"), ent("ORG", "中信"), ent("PER", "Smith works"), ent("ORG", "IBM")],
    "relations": [{"type": "Work_For", "head": ent("PER", "Smith works"), "tail": ent("ORG", "IBM")}],
    "events": [
        {
            "type": "质押",
            "trigger": {k: v for k, v in ent("t", "质押").items() if k != "type"},
            "arguments": [arg("质押方", "东方金钰")],
        }
    ],
}


class Spans(HTMLParser):
    """Collects every highlight piece: data-span id -> (attributes, text without label tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict[str, str] | None] = []
        self.pieces: dict[str, list[str]] = defaultdict(list)
        self.attrs: dict[str, dict[str, str]] = {}
        self.in_tag = 0
        self.tags_seen: list[str] = []
        self.sections: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags_seen.append(tag)
        if tag == "section":
            self.sections.append(a)
        if tag == "sup":
            self.in_tag += 1
        if tag == "span":
            self.stack.append(a if "data-span" in a else None)
            if "data-span" in a:
                self.attrs.setdefault(a["data-span"], a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "sup":
            self.in_tag -= 1
        if tag == "span":
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.in_tag:
            return
        for a in self.stack:
            if a is not None:
                self.pieces[a["data-span"]].append(data)


def parse(page: str) -> Spans:
    parser = Spans()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture()
def predictions(tmp_path: Path) -> Path:
    rows = [
        {"id": "r1", "text": TEXT, "answers": ['{"ORG":["东方金钰"]}'], "gold": GOLD, "pred": PRED},
        {
            "id": "r2",
            "text": "No entities here.",
            "gold": {"entities": [], "relations": [], "events": []},
            "pred": {"entities": [], "relations": [], "events": []},
        },
    ]
    path = tmp_path / "predictions.demo.constrained.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_spans_are_highlighted_in_place_with_statuses(predictions: Path) -> None:
    page = render_html(load_rows(predictions), "demo")
    parsed = parse(page)
    found: dict[tuple[str, str, int, int], str] = {}
    for span_id, attrs in parsed.attrs.items():
        start, end = int(attrs["data-start"]), int(attrs["data-end"])
        # Pieces of one span (split where it crosses another) join to exactly its text.
        assert "".join(parsed.pieces[span_id]) == TEXT[start:end], attrs
        classes = attrs["class"].split()
        status = next(c for c in classes if c in ("correct", "missed", "spurious", "pred"))
        kind = next(c for c in classes if c in ("entity", "trigger", "argument"))
        found[(kind, attrs["data-label"], start, end)] = status
        assert "--c:hsl(" in attrs["style"]
    e = {k: v for k, v in found.items() if k[0] == "entity"}
    assert e[("entity", "ORG", *span("东方金钰"))] == "correct"
    assert e[("entity", "ORG", *span("中信"))] == "spurious"
    assert e[("entity", "ORG", *span("中信证券"))] == "missed"
    assert e[("entity", "PER", *span("John Smith"))] == "missed"
    assert e[("entity", "PER", *span("Smith works"))] == "spurious"
    assert e[("entity", "ORG", *span("IBM"))] == "correct"
    assert found[("trigger", "质押", *span("质押"))] == "correct"
    assert found[("argument", "质押方", *span("东方金钰"))] == "correct"
    assert found[("argument", "质权方", *span("中信证券"))] == "missed"
    # "Smith works" crosses "John Smith": drawn in two pieces, the second marked as continuation.
    crossing = [k for k, a in parsed.attrs.items() if a["data-label"] == "PER" and "spurious" in a["class"]]
    assert len(crossing) == 1 and len(parsed.pieces[crossing[0]]) == 2
    assert 'class="hl entity spurious cont"' in page
    # Relations listed with their status; a clean record and an erroneous one are told apart.
    assert '<li class="rel spurious">' in page and '<li class="rel missed">' in page
    assert '<li class="event correct">' in page
    assert [s["class"] for s in parsed.sections] == ["rec errors", "rec clean"]
    assert "raw answers (1)" in page


def span(text: str) -> tuple[int, int]:
    start = TEXT.index(text)
    return start, start + len(text)


def test_page_is_self_contained(predictions: Path) -> None:
    page = render_html(load_rows(predictions))
    lowered = page.lower()
    for needle in ("<link", "<script", "src=", "@import", "url(", "http://", "https://"):
        assert needle not in lowered, needle
    assert "<style>" in page and page.startswith("<!DOCTYPE html>")


def test_extract_output_renders_without_gold(tmp_path: Path) -> None:
    row = {"id": "x", "text": TEXT, **PRED, "windows": 1, "dropped": 0}
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = load_rows(path)
    assert rows[0].gold is None
    marks = compare_marks(rows[0].pred, rows[0].gold)
    assert {m.status for m in marks} == {"pred"}
    parsed = parse(render_html(rows))
    assert len(parsed.attrs) == len(marks) == 6
    assert "missed" not in {c for a in parsed.attrs.values() for c in a["class"].split()}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"id": 1}', r"bad\.jsonl:1: text: expected a string"),
        (
            '{"text": "abc", "entities": [{"type": "A", "start": 1, "end": 9}]}',
            r"span \[1, 9\) outside the text",
        ),
        (
            '{"text": "abc", "pred": {"entities": [{"type": "A", "start": 0, "end": 2, "text": "xy"}]}}',
            r"pred\.entities\[0\]: span text 'xy' != text\[0:2\] 'ab'",
        ),
        ('{"text": "abc", "gold": {"events": [{"type": "E"}]}}', r"gold\.events\[0\]\.trigger"),
        ("not json", r"bad\.jsonl:1: invalid JSON"),
    ],
)
def test_bad_rows_are_located(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(row + "\n", encoding="utf-8")
    with pytest.raises(ViewError, match=message):
        load_rows(path)


def test_cli_view(predictions: Path, tmp_path: Path) -> None:
    out = tmp_path / "view.html"
    result = CliRunner().invoke(app, ["view", str(predictions), "-o", str(out), "--title", "Demo"])
    assert result.exit_code == 0, result.output
    assert "<title>Demo</title>" in out.read_text(encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["view", str(bad), "-o", str(tmp_path / "no.html")])
    assert result.exit_code == 1 and "bad.jsonl:1: text" in result.stderr
    assert not (tmp_path / "no.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (install it to render the page headless)")
def test_renders_in_headless_chromium(predictions: Path, tmp_path: Path) -> None:
    page = tmp_path / "view.html"
    write_view([predictions], page)
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path}/p",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = parse(dom.stdout)  # the DOM after the browser parsed the page: every span survived
    assert set(rendered.attrs) == set(parse(page.read_text(encoding="utf-8")).attrs)
    shot = tmp_path / "view.png"
    run = subprocess.run(
        [*flags, "--window-size=1000,900", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
