"""The ``chatuie`` command: extract, serve, view, evaluate, report, metrics, promote.

    chatuie extract --schema schema.json "张三在北京工作。"
    chatuie extract --schema schema.json -i in.jsonl -o out.jsonl     # resumable
    chatuie serve --model models/sft --port 8000 --api-key KEY
    chatuie view reports/eval/sft/predictions.conll04.constrained.jsonl -o view.html
    chatuie evaluate --model models:/chatuie@production --data test.txt --format tagging
    chatuie report
    chatuie metrics [--json]
    chatuie promote [--version N] | chatuie promote --rollback

Expected failures (bad input, a missing model) print one ``error: ...`` line naming the file,
line and field, and exit with status 1; nothing is half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from chatuie.errors import ChatuieError
from chatuie.serve.extractor import DEFAULT_MODEL

app = typer.Typer(
    name="chatuie",
    help="Grounded information extraction with a ChatUIE model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _logging() -> None:
    """Progress lines (chatuie.progress logs them where stderr is no terminal) reach stderr;
    other libraries stay at warnings."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("chatuie").setLevel(logging.INFO)


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="CHATUIE_MODEL",
        help="A saved model directory or an MLflow URI (models:/chatuie@production).",
    ),
]


def _fail(message: object) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _settings(max_new_tokens: int, batch_size: int, max_labels: int, context: int | None, overlap: int):
    from chatuie.serve.extractor import ExtractSettings

    return ExtractSettings(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_labels_per_instruction=max_labels,
        context_tokens=context,
        overlap_tokens=overlap,
    )


def _threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@app.command()
def extract(
    schema: Annotated[Path, typer.Option("--schema", "-s", help="Schema file (docs/schema.md).")],
    text: Annotated[str | None, typer.Argument(help="Text to extract from ('-' reads stdin).")] = None,
    model: ModelOption = DEFAULT_MODEL,
    input_path: Annotated[
        Path | None, typer.Option("--input", "-i", help="JSONL ({'id'?, 'text'} per line) or .txt input.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="JSONL output (resumed if present).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start the output file afresh instead of resuming.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Answer budget per instruction.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 32,
    max_labels: Annotated[int, typer.Option(help="Labels per instruction (0 = all in one).")] = 4,
    context: Annotated[
        int | None, typer.Option(help="Context tokens (default: the model's max_position_embeddings).")
    ] = None,
    overlap: Annotated[int, typer.Option(help="Tokens shared by consecutive windows of a long text.")] = 32,
    progress: Annotated[bool, typer.Option(help="Show a progress bar for file jobs.")] = True,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
) -> None:
    """Extract entities, relations and events with character offsets (constrained decoding)."""
    from chatuie.data.schema import ExtractionSchema
    from chatuie.data.text import check_text
    from chatuie.serve.extractor import Extractor
    from chatuie.serve.file_jobs import extract_file, read_inputs

    try:
        if (text is None) == (input_path is None):
            _fail("give either a TEXT argument or --input FILE (with --output FILE)")
        if input_path is not None and output is None:
            _fail("--input needs --output (the output file is what makes a job resumable)")
        if input_path is None and output is not None:
            _fail("--output goes with --input")
        parsed_schema = ExtractionSchema.load(schema)
        if text == "-":
            data = sys.stdin.buffer.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                _fail(f"stdin: not UTF-8 text (byte 0x{data[err.start]:02x} at byte {err.start})")
        if text is not None:  # an argument's undecodable bytes arrive as unpaired surrogates
            check_text(text, "TEXT")
        if text is not None and not text.strip():
            _fail("TEXT: empty")
        if input_path is not None:
            read_inputs(input_path)  # validate before the (slow) model load
        settings = _settings(max_new_tokens, batch_size, max_labels, context, overlap)
        _threads(threads)
        extractor = Extractor.load(model, settings)
        if text is not None:
            result = extractor.extract(text, parsed_schema)
            typer.echo(json.dumps({"text": text, **result}, ensure_ascii=False, indent=2))
            return
        assert input_path is not None and output is not None
        done = extract_file(
            extractor, parsed_schema, input_path, output, overwrite=overwrite, progress=progress
        )
        typer.echo(
            f"{output}: {done.written} written, {done.resumed} already done, {done.total} in total", err=True
        )
    except ChatuieError as err:
        _fail(err)


@app.command()
def serve(
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Interface to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CHATUIE_API_KEY", help="Require 'Authorization: Bearer KEY'.", show_default=False
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name clients ask for (default: the model's).")
    ] = None,
    batching: Annotated[bool, typer.Option(help="Decode concurrent /v1/extract requests together.")] = True,
    batch_window_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests.")] = 15.0,
    max_batch_size: Annotated[int, typer.Option(help="Requests per batch.")] = 8,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    max_text_chars: Annotated[int, typer.Option(help="Longest /v1/extract text.")] = 20_000,
    max_new_tokens: Annotated[int, typer.Option(help="Answer budget per instruction.")] = 256,
    max_labels: Annotated[int, typer.Option(help="Labels per instruction.")] = 4,
    context: Annotated[int | None, typer.Option(help="Context tokens (default: the model's).")] = None,
    overlap: Annotated[int, typer.Option(help="Tokens shared by consecutive windows.")] = 32,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
) -> None:
    """Serve the model over HTTP: OpenAI-compatible chat completions plus /v1/extract."""
    import logging

    from chatuie.serve.extractor import Extractor
    from chatuie.serve.server import serve as run_server
    from chatuie.serve.settings import ServerSettings

    logging.getLogger().setLevel(logging.INFO)  # the server's request log too (handler: _logging)
    try:
        _threads(threads)
        extractor = Extractor.load(model, _settings(max_new_tokens, 8, max_labels, context, overlap))
    except ChatuieError as err:
        _fail(err)
    settings = ServerSettings(
        model_name=name or extractor.name,
        api_key=api_key or None,
        batching=batching,
        batch_window_ms=batch_window_ms,
        max_batch_size=max_batch_size,
        max_request_bytes=max_request_bytes,
        max_text_chars=max_text_chars,
    )
    typer.echo(f"serving {settings.model_name!r} on http://{host}:{port}/v1", err=True)
    run_server(extractor, settings, host=host, port=port)


@app.command()
def view(
    inputs: Annotated[
        list[Path], typer.Argument(help="Predictions / extract JSONL files.", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML page to write.")] = Path(
        "view.html"
    ),
    title: Annotated[str | None, typer.Option(help="Page title (default: the file names).")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many records (0 = all).")] = 0,
) -> None:
    """Render extractions as a self-contained HTML page (gold vs predicted when gold exists)."""
    from chatuie.eval.viewer import write_view

    try:
        count = write_view(inputs, output, title=title, limit=limit)
    except ChatuieError as err:
        _fail(err)
    typer.echo(f"{output}: {count} records", err=True)


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", "-d", help="The annotated file to score on.")],
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="tagging | triples | duee | doccano | label_studio | records"),
    ],
    model: ModelOption = DEFAULT_MODEL,
    task: Annotated[str | None, typer.Option(help="ner | re | ee (default: the format's).")] = None,
    schema: Annotated[
        Path | None, typer.Option("--schema", "-s", help="Schema file (default: inferred from the data).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Predictions JSONL (`chatuie view` renders it).")
    ] = None,
    params: Annotated[
        Path, typer.Option(help="params.yaml whose evaluate section sets sampling and decoding.")
    ] = Path("params.yaml"),
    mode: Annotated[
        list[str] | None, typer.Option(help="constrained / free (default: evaluate.constraint_modes).")
    ] = None,
    max_records: Annotated[
        int | None, typer.Option(help="Seeded sample size (default: evaluate.settings; 0 = all).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
    tag_scheme: Annotated[str, typer.Option(help="tagging: auto | bio | iob1 | bioes | bmes")] = "auto",
    text_join: Annotated[str, typer.Option(help="tagging: auto | none | space")] = "auto",
) -> None:
    """Score a model on an annotated file, as the evaluate stage scores a zero-shot dataset."""
    import dataclasses

    from chatuie.config import build, load_params
    from chatuie.data.converters.formats import DeclaredDataset, FormatOptions, convert_declared, default_task
    from chatuie.eval.evaluation import EvalSettings, evaluate_dataset
    from chatuie.io import write_jsonl
    from chatuie.serve.model_refs import load_model_ref

    try:
        section = (load_params(params).get("evaluate") or {}) if params.is_file() else {}
        settings = build(EvalSettings, section.get("settings"), f"{params}: evaluate.settings")
        if max_records is not None:
            settings = dataclasses.replace(settings, max_records_per_dataset=max_records)
        modes = list(mode or section.get("constraint_modes") or ["constrained", "free"])
        bad = [m for m in modes if m not in ("constrained", "free")]
        if bad:
            _fail(f"--mode {bad[0]!r}: expected constrained or free")
        if not data.is_file():
            _fail(f"{data}: no such file")
        stem = data.name.split(".")[0]
        spec = DeclaredDataset(
            name=name or (stem if stem.replace("_", "").replace("-", "").isalnum() else "data"),
            task=task or default_task(fmt, data),
            format=fmt,
            files={"test": str(data)},
            schema=str(schema) if schema else None,
            options=FormatOptions(tag_scheme=tag_scheme, text_join=text_join),
        )
        records = convert_declared(spec).splits["test"]
        _threads(threads)
        loaded, tokenizer, _ = load_model_ref(model)
        from chatuie.data.prompts import prompt_options_for

        source = getattr(loaded, "name_or_path", None) or getattr(loaded.config, "_name_or_path", None)
        chat = prompt_options_for(source, params)
        from chatuie.models.modeling import merge_lora

        results = evaluate_dataset(merge_lora(loaded), tokenizer, records, chat, settings, modes)
    except ChatuieError as err:
        _fail(err)
    metrics = {spec.name: {m: result for m, (result, _, _) in results.items()}}
    if out is not None:
        for m, (_, _, predictions) in results.items():
            path = out if len(modes) == 1 else out.with_name(f"{out.stem}.{m}{out.suffix}")
            write_jsonl(path, predictions)
            typer.echo(f"{path}: {len(predictions)} predictions ({m})", err=True)
    if as_json:
        typer.echo(json.dumps(metrics, ensure_ascii=False, indent=2, sort_keys=True))
        return
    typer.echo(_f1_text(spec.name, spec.task, metrics[spec.name]))


def _f1_text(dataset: str, task: str, results: dict[str, dict]) -> str:
    """The F1 table: per mode the headline P / R / F1, the other F1s, validity, invented spans."""
    from chatuie.eval.metrics import HEADLINE

    headline = HEADLINE[task]
    lines = [f"{dataset} ({task}, headline {headline})"]
    header = ["mode", "records", "P", "R", "F1"]
    others = sorted({k for r in results.values() for k, v in r.items() if isinstance(v, dict)} - {headline})
    header += [f"{k} F1" for k in others] + ["valid JSON %", "invented %"]
    rows = [header]
    for m, r in results.items():
        head = r[headline]
        rows.append(
            [m, str(r["records"]), f"{head['precision']:.2f}", f"{head['recall']:.2f}", f"{r['f1']:.2f}"]
            + [f"{r[k]['f1']:.2f}" if k in r else "-" for k in others]
            + [f"{r['json_validity']:.2f}", f"{r['invented_span_rate']:.2f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


@app.command()
def report(
    metrics_dir: Annotated[Path, typer.Option(help="Where metrics/<model>.json live.")] = Path("metrics"),
    out_dir: Annotated[Path, typer.Option(help="Where report.md / report.html go.")] = Path("reports"),
    zero_shot: Annotated[list[str] | None, typer.Option(help="A dataset evaluated zero-shot.")] = None,
) -> None:
    """Write the run report (tables and plots of the paper) from the evaluate stage's metrics."""
    from chatuie.eval.report import ReportConfig, write_report

    try:
        written = write_report(metrics_dir, out_dir, ReportConfig(zero_shot=list(zero_shot or [])))
    except ChatuieError as err:
        _fail(err)
    for path in written:
        typer.echo(path)


@app.command()
def metrics(
    metrics_dir: Annotated[Path, typer.Option(help="Where metrics/<model>.json live.")] = Path("metrics"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The headline metrics per model (F1 with 95 % intervals, chat metrics, RL - SFT) in 80 columns.

    What `dvc metrics show` holds too, among every other number of the metrics files.
    """
    from chatuie.eval.summary import collect, render

    try:
        summary = collect(metrics_dir)
    except ChatuieError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(render(summary))


@app.command()
def promote(
    version: Annotated[int | None, typer.Option(help="Version to gate (default: the latest).")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Move production back one version.")] = False,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "chatuie",
    params: Annotated[Path, typer.Option(help="params.yaml whose `promote` section is the gate.")] = Path(
        "params.yaml"
    ),
) -> None:
    """Gate a registered version into `production` (else `candidate`), or roll production back.

    The registry is MLFLOW_TRACKING_URI's, else the project's mlflow/ store. Prints the decision as JSON.
    """
    import dataclasses

    from chatuie.config import build, load_params
    from chatuie.eval.gate import PromotionPolicy
    from chatuie.eval.promotion import promote as gate
    from chatuie.tracking import rollback as roll_back

    try:
        if rollback:
            decision = roll_back(name=name)
        else:
            policy = build(PromotionPolicy, load_params(params).get("promote"), f"{params}: promote")
            decision = gate(version, policy, name=name)
    except ChatuieError as err:
        _fail(err)
    typer.echo(json.dumps(dataclasses.asdict(decision)))


if __name__ == "__main__":
    app()
