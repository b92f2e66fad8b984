"""A file job records what it was run with (model fingerprint, schema, decoding settings) beside
its output, and a resume with anything else is refused by name instead of mixing results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from chatuie.cli import app
from chatuie.data.schema import ExtractionSchema
from chatuie.errors import ExtractError
from chatuie.models.modeling import load_saved
from chatuie.serve.extractor import Extractor, ExtractSettings
from chatuie.serve.file_jobs import extract_file
from tests.helpers.tiny_extractor import EN_TEXT, ZH_TEXT, tiny_model_dir

runner = CliRunner()
NER = {"entities": ["Peop", "Org"]}
RE = {"entities": ["Peop", "Org"], "relations": ["Work_For"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def inputs(tmp_path: Path, n: int = 2) -> Path:
    rows = [{"id": f"d{i}", "text": [EN_TEXT, ZH_TEXT][i % 2]} for i in range(n)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def extractor_for(folder: Path) -> Extractor:
    model, tokenizer = load_saved(folder)
    return Extractor(model, tokenizer, ExtractSettings(max_new_tokens=8))


def test_cli_resume_with_another_schema_or_settings_is_refused(model_dir: Path, tmp_path: Path) -> None:
    source, out = inputs(tmp_path), tmp_path / "out.jsonl"
    ner, relations = write(tmp_path / "ner.json", NER), write(tmp_path / "re.json", RE)

    def run(schema: Path, *extra: str) -> Any:
        args = ["extract", "-s", str(schema), "-m", str(model_dir), "-i", str(source), "-o", str(out)]
        return runner.invoke(app, [*args, "--max-new-tokens", "8", "--no-progress", *extra])

    result = run(ner)
    assert result.exit_code == 0, result.output
    ner_results = out.read_bytes()

    result = run(relations)  # the same -i/-o with a relation schema
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.stderr
    message = result.stderr
    assert f"error: {out}: its 2 results were made with other settings than this run" in message
    assert 'schema: was {"entities": ["Peop", "Org"], "events": {}, "relations": []}' in message
    assert '"relations": ["Work_For"]' in message and "pass --overwrite to start over" in message
    assert out.read_bytes() == ner_results, "the NER results are kept, nothing appended"

    record_path = tmp_path / "out.jsonl.job.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert record["schema"]["entities"] == ["Peop", "Org"] and record["schema"]["relations"] == []
    assert record["decoding"]["max_new_tokens"] == 8 and len(record["model"]["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "ner.json", "re.json", "out.jsonl", "out.jsonl.job.json"]
    ), "the record was renamed into place: no temporary file left"

    result = run(ner, "--max-new-tokens", "16", "--overlap", "8")
    assert result.exit_code == 1
    assert (
        "max_new_tokens: was 8, now 16" in result.stderr and "overlap_tokens: was 32, now 8" in result.stderr
    )

    result = run(ner, "--batch-size", "1")  # the batch size does not change the results
    assert result.exit_code == 0, result.output
    assert "0 written, 2 already done" in result.stderr

    result = run(relations, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "2 written, 0 already done" in result.stderr
    assert json.loads(record_path.read_text(encoding="utf-8"))["schema"]["relations"] == ["Work_For"]


def test_resume_with_another_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    source, out = inputs(tmp_path, 3), tmp_path / "out.jsonl"
    schema = ExtractionSchema.from_dict(NER)
    done = extract_file(extractor_for(model_dir), schema, source, out, progress=False)
    assert done.written == 3
    lines = out.read_text(encoding="utf-8").splitlines()
    out.write_text(lines[0] + "\n", encoding="utf-8")  # interrupted after one result

    copy = shutil.copytree(model_dir, tmp_path / "copy")  # the same model elsewhere: resumes
    done = extract_file(extractor_for(copy), schema, source, out, progress=False)
    assert (done.resumed, done.written) == (1, 2)

    out.write_text(lines[0] + "\n", encoding="utf-8")
    config = json.loads((copy / "generation_config.json").read_text(encoding="utf-8"))
    write(copy / "generation_config.json", {**config, "max_length": 77})  # retrained, say
    with pytest.raises(ExtractError) as err:
        extract_file(extractor_for(copy), schema, source, out, progress=False)
    assert f"model: was {model_dir} (sha256 " in str(err.value) and f"now {copy} (sha256 " in str(err.value)
    assert "pass --overwrite" in str(err.value)
    assert out.read_text(encoding="utf-8") == lines[0] + "\n"


def test_output_without_a_record_is_refused(model_dir: Path, tmp_path: Path) -> None:
    source, out = inputs(tmp_path), tmp_path / "out.jsonl"
    # What an older chatuie left: result lines and no record of what made them.
    out.write_text(json.dumps({"id": "d0", "text": EN_TEXT, "entities": []}) + "\n", encoding="utf-8")
    schema = ExtractionSchema.from_dict(NER)
    with pytest.raises(
        ExtractError, match=r"out\.jsonl: 1 results but no job record \(out\.jsonl\.job\.json\)"
    ):
        extract_file(extractor_for(model_dir), schema, source, out, progress=False)
    done = extract_file(extractor_for(model_dir), schema, source, out, overwrite=True, progress=False)
    assert (done.resumed, done.written) == (0, 2)
    assert (tmp_path / "out.jsonl.job.json").exists()
