"""``zray.runtime_env``: Ray's ``RuntimeEnv`` and ``RuntimeEnvConfig`` classes.

A ``RuntimeEnv`` is a dict of runtime_env keys (``working_dir``, ``py_modules``,
``pip``, ``uv``, ``env_vars``, ``excludes``, ``worker_process_setup_hook``,
``config``), checked when it is made; it goes wherever a runtime_env dict goes.
What each key does is in zray/_renv.py (driver) and workerd/renv.py (nodes).
"""

from __future__ import annotations

from zray import _renv

__all__ = ["RuntimeEnv", "RuntimeEnvConfig"]


class RuntimeEnvConfig(dict):
    """Options of the environment's set-up: ``setup_timeout_seconds`` (default 600; -1:
    no limit) bounds how long a node may take to set it up before the task fails with
    RuntimeEnvSetupError; ``eager_install`` (default True) starts setting up the job's
    environment on every node at ``init()`` instead of at its first task."""

    def __init__(self, setup_timeout_seconds: int = _renv.DEFAULT_SETUP_TIMEOUT_S,
                 eager_install: bool = True, **kwargs):
        if kwargs:
            raise ValueError(f"RuntimeEnvConfig: options {sorted(kwargs)} are not supported "
                             f"by zray (supported: {sorted(_renv.CONFIG_KEYS)})")
        super().__init__(_renv._check_config({"setup_timeout_seconds": setup_timeout_seconds,
                                              "eager_install": eager_install}))

    def to_dict(self) -> dict:
        return dict(self)


class RuntimeEnv(dict):
    """A runtime environment for a job, task or actor (Ray's ``RuntimeEnv``)."""

    def __init__(self, *, py_modules=None, working_dir=None, pip=None, conda=None,
                 container=None, env_vars=None, worker_process_setup_hook=None, config=None,
                 uv=None, image_uri=None, excludes=None, **kwargs):
        given = {"py_modules": py_modules, "working_dir": working_dir, "pip": pip,
                 "conda": conda, "container": container, "env_vars": env_vars,
                 "worker_process_setup_hook": worker_process_setup_hook, "config": config,
                 "uv": uv, "image_uri": image_uri, "excludes": excludes, **kwargs}
        super().__init__(_renv.check({k: v for k, v in given.items() if v is not None}))

    def to_dict(self) -> dict:
        return dict(self)

    @classmethod
    def _view(cls, values: dict) -> "RuntimeEnv":
        """A RuntimeEnv of what a running task has (not checked: its folders are
        packages on the cluster, not local paths)."""
        env = cls.__new__(cls)
        dict.update(env, values)
        return env
