"""The pipeline flow as a scheduled Prefect deployment (schedule from params.yaml's ``flow``).

    python flows/deploy.py serve                     # long-running: applies it, runs it on schedule
    python flows/deploy.py deploy --work-pool NAME   # register it with a work pool (a worker runs it)

``serve`` needs a Prefect API (``prefect server start`` + ``PREFECT_API_URL``, or the ephemeral one);
``deploy`` needs a server and a work pool, e.g. ``prefect work-pool create NAME --type process`` and
``prefect worker start --pool NAME``; the deployment's code is this checkout (``from_source``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python flows/deploy.py` puts flows/, not the root, on sys.path
    sys.path.insert(0, str(ROOT))

from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Cron, Schedule  # noqa: E402

from flows.pipeline import FlowConfig, flow_config, pipeline  # noqa: E402


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deploy the chatuie pipeline flow.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="serve the scheduled deployment (long-running)")
    deploy_cmd = sub.add_parser("deploy", help="register the deployment with a work pool")
    deploy_cmd.add_argument("--work-pool", required=True)
    for cmd in (serve_cmd, deploy_cmd):
        cmd.add_argument("--root", default=str(ROOT))
        cmd.add_argument("--name", default=None, help="deployment name (default: params flow.deployment)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.root, args.name)
    else:
        print(deploy_to_pool(args.work_pool, args.root, args.name))


if __name__ == "__main__":
    main()
