"""What every stage entry point shares: params loading, logging, MLflow tracking, a clean error exit.

``run(main)`` tracks the stage run in MLflow (chatuie.tracking) unless ``CHATUIE_TRACKING=off``.
The stage is recognised from dvc.yaml through DVC itself (foreach/matrix/vars resolved): the stage
whose ``cmd`` is this process's command line (``python -m tasks.evaluate sft`` -> ``evaluate@sft``),
or the one named by ``run(main, stage=...)`` / ``CHATUIE_STAGE``. DVC also gives the md5 of each
dependency (from its state cache: the hashes ``dvc repro`` just checked).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from chatuie.config import ConfigError, blame, build, load_params
from chatuie.errors import ChatuieError
from chatuie.models.precision import lineage
from chatuie.tracking import PlotFile, StageInfo, TrackingError, log_run_params, stage_run, tracking_enabled
from chatuie.train.allocator import keep_freed_memory

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("chatuie.stage")


def section(name: str, cls: type[T], params_path: Path | None = None) -> T:
    """Section ``name`` of params.yaml (the active profile merged in) as ``cls``; a mistake names the
    file that set the key (params.yaml, or the profile's overlay)."""
    path = params_path or Path("params.yaml")
    params = load_params(path)
    try:
        return build(cls, params.get(name), f"{path.name}: {name}")
    except ConfigError as err:
        raise ConfigError(blame(str(err), path, label=path.name)) from None


def run(
    main: Callable[[], Any], stage: str | None = None, *, track: bool = True, reuse_freed_memory: bool = True
) -> None:
    """Run a stage; a :class:`chatuie.errors.ChatuieError` prints one line and exits 1 (anything
    else is a bug and keeps its traceback).

    ``stage``: the DVC stage name, when the command line alone does not identify it.
    ``track=False``: a command that is no stage (a CLI) runs untracked.
    ``reuse_freed_memory``: big tensors reuse freed heap memory instead of page-faulting it in
    again (chatuie.train.allocator; faster, but the process keeps its peak memory).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if reuse_freed_memory:
        keep_freed_memory()
    try:
        with _tracked(stage) if track else contextlib.nullcontext():
            main()
    except ChatuieError as err:  # the user's to fix: one line naming the file, line or field
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def record_precision(setting: str, requested: str | bool, resolved: str | bool) -> dict[str, str]:
    """Say what a dtype setting resolved to on this machine: in the stage's log, as an MLflow param
    (``resolved.<setting>``), and as the returned block for the stage's metrics file."""
    info = lineage(requested, resolved)
    log.info("%s: %s -> %s on %s", setting, info["requested"], info["resolved"], info["device"])
    log_run_params({f"resolved.{setting}": info["resolved"], "resolved.device": info["device"]})
    return info


def set_threads(threads: int) -> None:
    """torch intra-op threads for this stage (0 = torch's default, one per core)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------- tracking


@contextlib.contextmanager
def _tracked(stage: str | None) -> Iterator[None]:
    if not tracking_enabled():
        yield
        return
    found = stage_info(stage or os.environ.get("CHATUIE_STAGE") or None)
    if found is None:
        log.warning("not a stage of dvc.yaml (%s): this run is not tracked", shlex.join(sys.argv))
        yield
        return
    info, root, params_file = found
    with stage_run(info, root, params_file):
        yield


def _argv_of(cmd: str) -> list[str]:
    """``python -u -m tasks.x a`` (or ``python -m tasks.x a``) -> ``["tasks/x.py", "a"]``: the
    script and its arguments."""
    words = shlex.split(cmd)
    if words and Path(words[0]).name.startswith("python"):
        words = words[1:]
        while words and words[0].startswith("-") and words[0] != "-m":
            words = words[1:]
    if len(words) >= 2 and words[0] == "-m":
        words = [words[1].replace(".", "/") + ".py", *words[2:]]
    return words


def _same_command(cmd: str | list[str], wdir: Path) -> bool:
    me = [str(Path(sys.argv[0]).resolve()), *sys.argv[1:]]
    for line in [cmd] if isinstance(cmd, str) else cmd:
        words = _argv_of(line)
        if words and [str((wdir / words[0]).resolve()), *words[1:]] == me:
            return True
    return False


def stage_address(stage: Any, root: Path) -> str:
    """A DVC stage's name as `dvc repro` run in ``root`` calls it ("sft", "evaluate@sft"; DVC's own
    ``addressing`` follows the cwd). Also the flows' task names (flows/pipeline.py)."""
    dvc_file = Path(stage.path).resolve()
    if dvc_file == root.resolve() / "dvc.yaml":
        return stage.name
    return f"{dvc_file.relative_to(root.resolve())}:{stage.name}"


def stage_info(name: str | None = None) -> tuple[StageInfo, Path, dict[str, Any]] | None:
    """(StageInfo, repo root, params.yaml) of the stage this process runs, None if it is none."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        return None
    try:
        root = Path(repo.root_dir)
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        if name:
            matches = [s for s in stages if stage_address(s, root) == name]
            if not matches:
                raise TrackingError(f"no stage {name!r} in {root / 'dvc.yaml'}")
        else:
            matches = [s for s in stages if _same_command(s.cmd, Path(s.wdir))]
        if not matches:
            return None
        if len(matches) > 1:
            names = ", ".join(stage_address(s, root) for s in matches)
            raise TrackingError(
                f"this command is the cmd of several stages ({names}): pass run(main, stage=...)"
            )
        stage = matches[0]
        params_file = load_params(root / "params.yaml") if (root / "params.yaml").exists() else {}
        params: dict[str, Any] = {}
        deps: dict[str, str] = {}
        for dep in stage.deps:
            if hasattr(dep, "read_params"):  # a params dependency: its sections, by listed name
                params.update(_stage_params(dep, root, params_file))
            else:
                deps[dep.def_path] = dep.get_hash().value or "missing"
        metrics, plots, outs = [], [], []
        for out in stage.outs:
            if out.metric:
                metrics.append(out.def_path)
            elif out.plot:
                props = out.plot if isinstance(out.plot, dict) else {}
                plots.append(PlotFile(out.def_path, props.get("x"), props.get("y")))
            elif not out.persist:  # persistent outputs (checkpoints, the judge cache) outlive runs
                outs.append(out.def_path)
        cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
        info = StageInfo(stage_address(stage, root), cmd, params, deps, metrics, plots, outs)
    except DvcException as err:
        raise TrackingError(f"reading the stage from dvc.yaml failed: {err}") from err
    finally:
        repo.close()
    return info, root, params_file


def _stage_params(dep: Any, root: Path, merged: dict[str, Any]) -> dict[str, Any]:
    """A params dependency's values by listed name ("sft", "samples.chat"), as the stage reads them:
    from ``merged``, params.yaml with the active profile merged in (load_params; DVC's own reading
    would give params.yaml's defaults); the profile's own overlay adds nothing more (its values are
    in that merge). Another params file is read by DVC, as written."""
    path = Path(dep.fs_path).resolve()
    if path.parent == (root / "profiles").resolve():
        return {}
    if path != (root / "params.yaml").resolve():
        return dep.read_params()
    if not dep.params:  # `- params.yaml:`: all of it
        return merged
    values = {}
    for name in dep.params:
        node: Any = merged
        for key in name.split("."):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            values[name] = node
    return values
