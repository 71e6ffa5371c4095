"""The shipped configs validate, and AppArgs refuses what it cannot honour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.common.config import AppArgs, DeploymentOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_shipped_config_args_validate_into_app_args(name):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / name).read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` accept
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert set(args.model_configs()) == {"instruct", "thinking"}


def test_default_config_is_local_only_and_uses_the_tiny_preset():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert {c.checkpoint for c in args.model_configs().values()} == {"preset:tiny"}
    assert all(v.deployment.autoscaling_config for v in (args.instruct, args.thinking))


def test_a_variant_set_to_null_is_left_out():
    args = AppArgs.model_validate({"thinking": None})
    assert list(args.model_configs()) == ["instruct"]


def test_no_variant_at_all_is_refused():
    with pytest.raises(ValueError, match="At least one"):
        AppArgs.model_validate({"instruct": None, "thinking": None}).model_configs()


def test_unknown_keys_are_errors_not_ignored():
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"instruct": {"modle": {}}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"instruct": {"model": {"chekpoint": "x"}}})


def test_served_names_default_per_variant_and_can_be_overridden():
    args = AppArgs.model_validate({"instruct": {"model": {"served_name": "mine"}}})
    configs = args.model_configs()
    assert configs["instruct"].name == "mine"
    assert configs["thinking"].name == "MiniCPM-V-4.6-Thinking"


def test_deployment_without_replica_settings_gets_one_replica():
    assert DeploymentOptions().serve_options()["num_replicas"] == 1
    options = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 3}).serve_options()
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 3


def test_queue_sizes_follow_the_batch_size_unless_set():
    from deployments.common.config import VariantArgs

    derived = VariantArgs.model_validate({"model": {"max_batch_size": 6},
                                          "deployment": {"autoscaling_config": {"max_replicas": 3}}}).serve_options()
    assert derived["max_ongoing_requests"] == 12
    assert derived["autoscaling_config"] == {"target_ongoing_requests": 6, "max_replicas": 3}
    explicit = VariantArgs.model_validate({"model": {"max_batch_size": 6}, "deployment": {
        "max_ongoing_requests": 3, "autoscaling_config": {"target_ongoing_requests": 1}}}).serve_options()
    assert explicit["max_ongoing_requests"] == 3 and explicit["autoscaling_config"]["target_ongoing_requests"] == 1


def test_model_deployments_route_by_chat_affinity_unless_turned_off():
    from deployments.common.config import VariantArgs

    scaled = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    options = VariantArgs.model_validate({"model": {"max_batch_size": 6}, "deployment": scaled}).serve_options()
    assert options["request_router_config"] == {"request_router_class": "deployments.replica.affinity:ChatAffinityRouter",
                                                "request_router_kwargs": {"busy_requests": 6}}
    assert "request_router_config" in VariantArgs.model_validate({"deployment": {"num_replicas": 2}}).serve_options()
    assert "request_router_config" not in VariantArgs.model_validate(
        {"deployment": scaled, "chat_affinity": False}).serve_options()
    # One replica: nothing to choose, and Serve's CLI need not import the router.
    assert "request_router_config" not in VariantArgs().serve_options()


def test_the_venv_makes_the_request_router_importable_from_any_directory(tmp_path):
    """`serve status` / `serve shutdown` (console scripts, run from anywhere) import it by name."""
    code = "import deployments.replica.affinity"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_router_accepts_many_streams_unless_told_otherwise_and_serve_leaves_it_room_to_refuse():
    from deployments.common.config import ROUTER_HEADROOM, RouterArgs

    assert RouterArgs().max_ongoing_chats == 256
    assert RouterArgs().serve_options()["max_ongoing_requests"] == 256 + ROUTER_HEADROOM
    nine = RouterArgs.model_validate({"deployment": {"max_ongoing_requests": 9}})
    assert nine.max_ongoing_chats == 9 and nine.serve_options()["max_ongoing_requests"] == 9 + ROUTER_HEADROOM


def test_a_zero_length_queue_is_refused_in_the_config_not_by_serve_at_deploy_time():
    from deployments.common.config import DeploymentOptions

    with pytest.raises(ValueError, match="at least 1"):
        DeploymentOptions(max_queued_requests=0)
    assert DeploymentOptions(max_queued_requests=-1).max_queued_requests == -1


def test_the_router_side_of_the_app_imports_neither_torch_nor_transformers():
    code = ("import sys, serve_app, deployments.ingress.router; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
