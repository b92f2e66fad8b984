"""dvc.yaml's code deps are exactly what each stage imports, so no stage goes silently stale.

A stage run as ``python -m tasks.<name> ...`` must depend on every file under src/chatuie/ and
tasks/ that the module loads, directly or not (tests/helpers/import_closure.py, read statically):
a change to src/chatuie/data/prompts.py once left ``evaluate@sft`` "up to date". A dep covers a
file when it is that file or a folder above it. A code dep that covers none of the stage's files
(a moved or deleted module, a module the stage stopped importing) only costs reruns: it fails too.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.import_closure import ROOT, SCOPE, import_closure
from tests.helpers.pipeline_repo import make_repo, run


def stage_module(cmd: str) -> str | None:
    """``python -m tasks.evaluate ${item}`` (or ``python -u -m ...``) -> ``tasks.evaluate``; else None."""
    words = shlex.split(cmd)
    if not words or not Path(words[0]).name.startswith("python") or "-m" not in words[:-1]:
        return None
    module = words[words.index("-m") + 1]
    return module if module.startswith("tasks.") else None


def is_code(dep: str) -> bool:
    return any(dep == s or dep.startswith(s + "/") for s in SCOPE)


def covers(dep: str, file: str) -> bool:
    dep = dep.rstrip("/")
    return file == dep or file.startswith(dep + "/")


def yaml_stages(dvc_yaml: dict[str, Any]) -> dict[str, tuple[str, str, list[str]]]:
    """stage -> (where its deps are, in words; its ``cmd``; its deps), for plain and foreach stages."""
    stages = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        body, where = (
            (stage["do"], f"stages.{name}.do.deps") if "foreach" in stage else (stage, f"stages.{name}.deps")
        )
        stages[name] = (where, body.get("cmd", ""), [d for d in body.get("deps", []) if isinstance(d, str)])
    return stages


def _all_py(folder: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}


def lines_to_add(missing: set[str]) -> list[str]:
    """The deps to add for ``missing``: a folder where every .py file under it is missing, else files."""
    ancestors = {p.as_posix() for f in missing for p in Path(f).parents} - {"."}
    folders = sorted(ancestors, key=lambda f: (f.count("/"), f))  # the topmost first
    chosen: list[str] = []
    for folder in folders:
        if any(covers(c, folder) for c in chosen):
            continue
        if is_code(folder) and folder not in SCOPE and _all_py(folder) <= missing:
            chosen.append(folder)
    files = [f for f in missing if not any(covers(c, f) for c in chosen)]
    return sorted(chosen + files)


def deps_problems(dvc_yaml: dict[str, Any]) -> dict[str, str]:
    """stage -> what is wrong with its code deps (the lines to add, to remove); {} when all is well."""
    problems = {}
    for name, (where, cmd, deps) in yaml_stages(dvc_yaml).items():
        module = stage_module(cmd)
        if module is None:
            continue
        closure = import_closure(module)
        code = [d for d in deps if is_code(d)]
        missing = {f for f in closure if not any(covers(d, f) for d in code)}
        dead = [d for d in code if not any(covers(d, f) for f in closure)]
        text = []
        if missing:
            text.append(f"{module} imports files no dep covers; add to {where}:")
            text += [f"  - {line}" for line in lines_to_add(missing)]
        if dead:
            text.append(f"code deps that cover no file {module} imports; remove from {where}:")
            text += [f"  - {line}" for line in dead]
        if text:
            problems[name] = "\n".join(text)
    return problems


def load_dvc_yaml(root: Path = ROOT) -> dict[str, Any]:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def test_every_stage_depends_on_what_it_imports() -> None:
    problems = deps_problems(load_dvc_yaml())
    assert not problems, "dvc.yaml's code deps are not what the stages import:\n\n" + "\n\n".join(
        f"{name}: {text}" for name, text in problems.items()
    )


def test_every_stage_is_checked() -> None:
    """Each stage runs a tasks module (a cmd of another form would escape the deps check)."""
    stages = yaml_stages(load_dvc_yaml())
    assert stages and all(stage_module(cmd) for _, cmd, _ in stages.values()), {
        name: cmd for name, (_, cmd, _) in stages.items() if not stage_module(cmd)
    }
    assert stage_module("python -u -m tasks.evaluate ${item}") == "tasks.evaluate"
    assert stage_module("python scripts/x.py") is None


def test_the_closure_sees_what_evaluate_imports() -> None:
    closure = import_closure("tasks.evaluate")
    for file in (
        "tasks/evaluate.py",
        "tasks/__init__.py",  # `-m tasks.evaluate` runs the package first
        "tasks/_stage.py",
        "src/chatuie/__init__.py",
        "src/chatuie/data/prompts.py",  # the prompt the model is evaluated on
        "src/chatuie/data/answers.py",  # the answer format it is parsed with
        "src/chatuie/decoding/grammar.py",
    ):
        assert file in closure, file
    assert all(is_code(f) and (ROOT / f).is_file() for f in closure)
    assert "src/chatuie/rl/trainer.py" not in closure


def test_imports_by_name_are_followed() -> None:
    """check_params builds each section with a class it imports by name (SECTIONS): those count."""
    closure = import_closure("tasks.check_params")
    by_name = {"src/chatuie/train/trainer.py", "src/chatuie/reward/pairs.py", "src/chatuie/eval/report.py"}
    assert by_name <= closure


def test_an_omitted_dep_fails_with_the_lines_to_add() -> None:
    """The check catches what went stale before: evaluate without the prompts, or without its own module."""
    dvc_yaml = load_dvc_yaml()
    deps = dvc_yaml["stages"]["evaluate"]["do"]["deps"]
    gone = {"src/chatuie/data/prompts.py", "tasks/evaluate.py"}
    dvc_yaml["stages"]["evaluate"]["do"]["deps"] = [d for d in deps if d not in gone] + [
        "src/chatuie/gone.py"
    ]
    problems = deps_problems(dvc_yaml)
    text = problems["evaluate"]
    assert "add to stages.evaluate.do.deps:" in text
    assert "  - src/chatuie/data/prompts.py" in text.splitlines()
    assert "  - tasks/evaluate.py" in text.splitlines()
    assert "remove from stages.evaluate.do.deps:\n  - src/chatuie/gone.py" in text
    # A folder only where the whole folder is imported.
    assert lines_to_add(_all_py("src/chatuie/decoding") | {"src/chatuie/io.py"}) == [
        "src/chatuie/decoding",
        "src/chatuie/io.py",
    ]
    assert lines_to_add(_all_py("src/chatuie/data") - {"src/chatuie/data/validation.py"}) == sorted(
        ["src/chatuie/data/converters"]
        + [
            f
            for f in _all_py("src/chatuie/data")
            if "/converters/" not in f and not f.endswith("validation.py")
        ]
    )


def _dvc_stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """stage address -> (cmd, its file deps), as DVC itself reads dvc.yaml (foreach expanded)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            stage.addressing: (
                stage.cmd,
                [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)],
            )
            for stage in repo.index.stages
            if getattr(stage, "cmd", None)
        }


def test_dvc_sees_every_imported_file_as_a_dep() -> None:
    """The same check on DVC's own view of the pipeline (foreach stages expanded, interpolation done)."""
    stages = _dvc_stages(ROOT)
    assert "evaluate@sft" in stages
    uncovered = {}
    for address, (cmd, deps) in stages.items():
        module = stage_module(cmd)
        assert module, f"{address}: {cmd}"
        missing = sorted(f for f in import_closure(module) if not any(covers(d, f) for d in deps))
        if missing:
            uncovered[address] = missing
    assert not uncovered, f"see test_every_stage_depends_on_what_it_imports: {uncovered}"
    assert "src/chatuie/data/prompts.py" in stages["evaluate@sft"][1]


def test_dvc_status_notices_a_prompt_change(tmp_path: Path, subprocess_env, monkeypatch) -> None:
    """In a copy of the pipeline (smoke profile): evaluate@sft's deps recorded in dvc.lock as they are
    (no run), then a comment appended to the prompts: `dvc status` names the prompts as modified."""
    from dvc.repo import Repo

    repo_dir = make_repo(tmp_path / "repo", profile="smoke")
    monkeypatch.chdir(repo_dir)  # DVC resolves a stage's paths against the working directory
    with Repo(str(repo_dir)) as repo, repo.lock:
        (stage,) = repo.stage.collect("evaluate@sft")
        stage.save(allow_missing=True, run_cache=False)  # the deps' hashes now; models/sft etc. absent
        stage.dump(update_pipeline=False)  # dvc.lock only

    def changed_deps() -> dict[str, str]:
        out = run(["dvc", "status", "--json", "evaluate@sft"], repo_dir, subprocess_env).stdout
        entries = json.loads(out).get("evaluate@sft", [])
        return next((e["changed deps"] for e in entries if "changed deps" in e), {})

    before = changed_deps()
    assert "src/chatuie/data/prompts.py" not in before, before
    assert all(not is_code(d) for d in before), before  # only the absent data deps
    with (repo_dir / "src" / "chatuie" / "data" / "prompts.py").open("a") as f:
        f.write("# a prompt change\n")
    after = changed_deps()
    assert after.get("src/chatuie/data/prompts.py") == "modified", after
