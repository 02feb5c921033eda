"""Write a copy of serve/config.yaml for one deployment: the model, ServeSettings values, the port, a working_dir.

    python scripts/serve_config.py --model models:/mammo-ray-ensemble@champion \
        --set num_gpus=0.25 --set tracking_uri=$MLFLOW_TRACKING_URI --out work/serve-gpu.yaml
    serve deploy work/serve-gpu.yaml

Each ``--set`` goes where the config keeps it (``mammo_ray.serving.app.place_setting``): thresholds
and batching in ``EnsembleModel``'s ``user_config``, resources in its ``ray_actor_options``, replicas
and queue bounds on the deployment, the rest in the application's ``args``. Everything else stays
as committed (``import_path: serve.app:build_app``, HTTP on 127.0.0.1).
``--working-dir`` adds the application's ``runtime_env`` working_dir, which `serve deploy` needs
when ``serve.app`` is not importable on the cluster already: a ``local://`` directory that every
node has (shared storage, or the one node of a local cluster) or a remote zip (``s3://...zip``,
``https://...zip``); ``serve deploy`` uploads nothing itself.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

COMMITTED = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="models:/<name>/<version>, a run id or a checkpoint")
    parser.add_argument(
        "--set",
        dest="args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ServeSettings value (repeatable; VALUE is YAML), e.g. num_gpus=0.25 or threshold=0.4",
    )
    parser.add_argument("--port", type=int, help="HTTP port (default: as committed, 8000)")
    parser.add_argument("--host", help="HTTP bind address (default: as committed, 127.0.0.1)")
    parser.add_argument("--working-dir", help="the application's runtime_env working_dir (local://DIR or a zip URI)")
    parser.add_argument("--config", default=str(COMMITTED), help="the config to start from")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from mammo_ray.serving.app import check_app_config, place_setting

    config = yaml.safe_load(Path(args.config).read_text())
    (app,) = config["applications"]
    app["args"]["model"] = args.model
    for item in args.args:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        place_setting(app, key.strip(), yaml.safe_load(text))
    if args.port:
        config["http_options"]["port"] = args.port
    if args.host:
        config["http_options"]["host"] = args.host
    if args.working_dir:
        app.setdefault("runtime_env", {})["working_dir"] = args.working_dir

    from ray.serve.schema import ServeDeploySchema

    check_app_config(app)  # unknown or invalid keys fail here, not on the cluster
    ServeDeploySchema.model_validate(config)  # and so does what Serve itself would refuse
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))
    print(args.out)


if __name__ == "__main__":
    main()
