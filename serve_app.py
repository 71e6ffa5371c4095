"""The Ray Serve application: `serve run serve_config.yaml` calls `build_app` with the YAML `args:`.

No `from __future__ import annotations` here: Serve reads the real type of `args` from the
signature to validate the YAML into `AppArgs`.
"""


from ray.serve import Application

from deployments.common.config import AppArgs
from deployments.replica.deployment import ModelDeployment
from deployments.ingress.router import Router


def build_app(args: AppArgs) -> Application:
    """Bind one model deployment per configured variant (named after it) behind the router."""
    configs = args.model_configs()
    handles = {
        variant: ModelDeployment.options(name=variant, **getattr(args, variant).serve_options()).bind(config)
        for variant, config in configs.items()
    }
    router = Router.options(name="router", **args.router.serve_options())
    return router.bind(configs, handles, args.router)
