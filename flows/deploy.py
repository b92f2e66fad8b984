"""The pipeline flow as a scheduled Prefect deployment (schedule from params.yaml's ``flow``).

    python -m flows.deploy serve                     # long-running: applies it, runs it on schedule
    python -m flows.deploy deploy --work-pool NAME   # register it with a work pool (a worker runs it)

    python -m flows.deploy deploy-stage [--work-pool NAME]  # the one-stage flow (flow.remote_stages)

``serve`` needs a Prefect API (``prefect server start`` + ``PREFECT_API_URL``, or the ephemeral one);
``deploy`` needs a server and a work pool, e.g. ``prefect work-pool create NAME --type process`` and
``prefect worker start --pool NAME``; the deployment's code is this checkout (``from_source``).
``deploy-stage`` registers ``chatuie-stage/<flow.stage_deployment>`` on ``flow.work_pool`` (or
``--work-pool``), run from ``--root`` (the checkout the worker's machine sees): the pipeline flow
sends the stages of ``flow.remote_stages`` there, and a worker of that pool runs them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from uuid import UUID

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Schedule

from flows.pipeline import FlowConfig, flow_config, pipeline, stage_flow

ROOT = Path(__file__).resolve().parents[1]


def schedule_of(config: FlowConfig) -> Schedule:
    return Cron(config.schedule.cron, timezone=config.schedule.timezone, active=config.schedule.active)


def build_deployment(root: str | Path = ROOT, name: str | None = None) -> RunnerDeployment:
    """The pipeline of ``root`` as a deployment with the params' schedule (not yet applied)."""
    root = Path(root).resolve()
    config = flow_config(root)
    return pipeline.to_deployment(
        name=name or config.deployment,
        schedule=schedule_of(config),
        parameters={"root": str(root)},
        tags=["chatuie"],
        description=f"chatuie DVC pipeline of {root}",
    )


def serve(root: str | Path = ROOT, name: str | None = None) -> None:
    """Apply the deployment and run its scheduled (and manual) runs here; blocks until stopped."""
    from prefect import serve as prefect_serve

    prefect_serve(build_deployment(root, name))


def deploy_to_pool(work_pool: str, root: str | Path = ROOT, name: str | None = None) -> UUID:
    """The same deployment, for a worker of ``work_pool`` (code: this checkout, not an image)."""
    root = Path(root).resolve()
    config = flow_config(root)
    remote = pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:pipeline")
    return remote.deploy(
        name=name or config.deployment,
        work_pool_name=work_pool,
        schedule=schedule_of(config),
        parameters={"root": str(root)},
        tags=["chatuie"],
        build=False,
        push=False,
        print_next_steps=False,
    )


def deploy_stage(work_pool: str | None = None, root: str | Path = ROOT, name: str | None = None) -> UUID:
    """The one-stage flow as a deployment of ``work_pool`` (default ``flow.work_pool``), no schedule:
    the pipeline flow creates its runs (``flow.remote_stages``); ``root`` is where they run."""
    root = Path(root).resolve()
    config = flow_config(root)
    remote = stage_flow.from_source(source=str(root), entrypoint="flows/pipeline.py:stage_flow")
    return remote.deploy(
        name=name or config.stage_deployment,
        work_pool_name=work_pool or config.work_pool,
        parameters={"root": str(root)},
        tags=["chatuie", "stage"],
        description=f"one chatuie DVC stage (dvc repro --single-item) in {root}",
        build=False,
        push=False,
        print_next_steps=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deploy the chatuie pipeline flow.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="serve the scheduled deployment (long-running)")
    deploy_cmd = sub.add_parser("deploy", help="register the deployment with a work pool")
    deploy_cmd.add_argument("--work-pool", required=True)
    stage_cmd = sub.add_parser("deploy-stage", help="register the one-stage flow with a work pool")
    stage_cmd.add_argument("--work-pool", default=None, help="default: params flow.work_pool")
    for cmd in (serve_cmd, deploy_cmd, stage_cmd):
        cmd.add_argument("--root", default=str(ROOT))
        cmd.add_argument(
            "--name",
            default=None,
            help="deployment name (default: params flow.deployment / stage_deployment)",
        )
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.root, args.name)
    elif args.command == "deploy":
        print(deploy_to_pool(args.work_pool, args.root, args.name))
    else:
        print(deploy_stage(args.work_pool, args.root, args.name))


if __name__ == "__main__":
    main()
