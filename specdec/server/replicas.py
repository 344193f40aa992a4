"""``specdec serve --replicas N``: N engine replicas behind Ray Serve's HTTP proxy.

Each replica is a Ray Serve replica (a Ray actor: a process of its own) holding its own engine and serving the
app ``specdec serve`` serves (``create_app``: the same OpenAI-compatible API, streaming included, the same
admission and errors). Ray Serve's proxy takes the HTTP requests and routes each to a replica; its default
router picks the replica with fewer requests in flight of two chosen at random (power of two choices), which
is the routing by fewest running requests that an engine replica wants. Every response names its replica in
the ``x-specdec-replica`` header.

``GET /metrics`` on any replica answers for all of them: the replica that receives it asks every replica of the
deployment for its Prometheus text (``DeploymentHandle.broadcast``) and labels each sample with ``replica``;
``specdec_replica_info{replica, pid}`` tells which process each is.

Faults are Ray Serve's: a replica whose process dies is replaced by its controller; requests in flight on it
end with the proxy's 5xx, requests on the others are untouched. SIGTERM / SIGINT to the serving process shut
Serve down (each replica finishes its requests in flight, up to ``graceful_shutdown_timeout_s``) and it exits 0.

In a Ray cluster of your own, deploy ``application(...)`` with ``serve.run``, or from a shell:
``serve run specdec.server.replicas:app_builder model=smollm2-135m-instruct num_replicas=2``.
"""

from __future__ import annotations

import os
import signal
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from specdec.server.app import create_app
from specdec.server.config import ServerConfig
from specdec.server.run import build_engine

DEPLOYMENT = "specdec"
HEADER = "x-specdec-replica"
METRICS_SECONDS = 5.0  # GET /metrics waits this long for the other replicas' figures


class Replica:
    """One engine and its app; Ray Serve's deployment class (``deployment()`` wraps it)."""

    def __init__(self, build: dict, config: ServerConfig, threads: int | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.engine, self.tokenizer = build_engine(**build)
        self.config = config
        self.served = None  # its app, once built (``app`` is Ray's)

    def __serve_build_asgi_app__(self):
        """The app ``specdec serve`` runs (its engine thread starts and stops with the app's lifespan), with
        the replica's name on every response and GET /metrics answered for every replica."""
        from fastapi import Response
        from ray import serve

        context = serve.get_replica_context()
        app = self.served = create_app(self.engine, self.tokenizer, self.config)

        @app.middleware("http")
        async def replica(request, call_next):  # (before routing: GET /metrics is answered here for all)
            if request.method == "GET" and request.url.path == "/metrics":
                response = Response(merge_metrics(await self._every_replica(context)), media_type=CONTENT_TYPE_LATEST)
            else:
                response = await call_next(request)
            response.headers[HEADER] = context.replica_tag
            return response

        return app

    async def _every_replica(self, context) -> list[tuple[str, int, str]]:
        """Every replica's ``metrics_text`` that answers within METRICS_SECONDS (this one's at least): a replica
        that died or hangs is left out, not the whole answer."""
        from ray import serve

        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        try:
            answers = await handle.broadcast("metrics_text").results_async(timeout_s=METRICS_SECONDS,
                                                                            return_exceptions=True)
        except TimeoutError:
            answers = []
        texts = [a for a in answers if isinstance(a, tuple)]
        return texts if any(name == context.replica_tag for name, _, _ in texts) else [self.metrics_text(), *texts]

    def metrics_text(self) -> tuple[str, int, str]:
        """This replica's name, PID and Prometheus text."""
        from ray import serve

        return (serve.get_replica_context().replica_tag, os.getpid(),
                generate_latest(self.served.state.server.metrics.registry).decode())


def application(build: dict, config: ServerConfig, replicas: int = 1, *, autoscaling: dict | None = None,
                cpus_per_replica: float | None = None, grace_seconds: float = 10.0, max_num_seqs: int = 32):
    """The Ray Serve application: ``replicas`` engine replicas (``build``: ``build_engine``'s arguments), or
    Ray Serve's autoscaling between ``autoscaling["min_replicas"]`` and ``["max_replicas"]`` (its other keys
    passed through); each replica reserves ``cpus_per_replica`` of Ray's CPUs (default: the machine's cores
    shared among the most replicas there can be, a fraction where they are more) and runs torch on as many
    threads (one at least)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    most = (autoscaling or {}).get("max_replicas", replicas)
    cpus = cpus_per_replica if cpus_per_replica is not None else (os.cpu_count() or 1) / most
    # a replica takes what its engine runs and queues; beyond that Ray's proxy queues config.max_queued more per
    # deployment and answers the rest 429, as one server does
    options = dict(ray_actor_options={"num_cpus": cpus}, graceful_shutdown_timeout_s=grace_seconds,
                   max_ongoing_requests=max_num_seqs + config.max_queued,
                   max_queued_requests=max(1, config.max_queued),  # (Ray takes no 0)
                   backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1))
    if autoscaling:
        options["autoscaling_config"] = {"initial_replicas": replicas, **autoscaling}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(Replica), name=DEPLOYMENT, **options)
    return deployment.bind(build, config, max(1, int(cpus)))


def app_builder(args: dict):
    """``serve run specdec.server.replicas:app_builder model=NAME [draft=ngram] [num_replicas=2] ...``: the
    application for a Ray cluster of your own (``args``: build_engine's and application's settings)."""
    args = dict(args)
    config = ServerConfig(model_name=args["model"], max_queued=int(args.pop("max_queued", 64)))
    replicas, seqs = int(args.pop("num_replicas", 1)), int(args.pop("max_num_seqs", 32))
    build = dict(model=args.pop("model"), draft=args.pop("draft", "ngram"),
                 num_draft_tokens=args.pop("num_draft_tokens", "auto"), max_num_seqs=seqs,
                 kv_blocks=int(args.pop("kv_blocks", 1024)), block_size=int(args.pop("block_size", 16)),
                 dtype=args.pop("dtype", None), quantize=args.pop("quantize", None),
                 activations=args.pop("activations", "int8"))
    if build["num_draft_tokens"] != "auto":
        build["num_draft_tokens"] = int(build["num_draft_tokens"])
    if args:
        raise ValueError(f"unknown settings for specdec's application: {sorted(args)}")
    return application(build, config, replicas, max_num_seqs=seqs)


def serve_replicas(replicas: int, build: dict, config: ServerConfig, grace_seconds: float, host: str, port: int,
                   autoscaling: dict | None = None) -> int:
    """``specdec serve --replicas N``: a local Ray instance, Serve's proxy on ``host:port``, the replicas;
    until SIGTERM / SIGINT, then Serve shut down (requests in flight finish) and exit 0."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ValueError(f"replicas={replicas}: Ray Serve is not installed ({err}); pip install "
                         "'specdec[replicas]'") from err

    ray.init(include_dashboard=False, configure_logging=False)
    stop, previous = threading.Event(), {}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(build, config, replicas, autoscaling=autoscaling, grace_seconds=grace_seconds,
                              max_num_seqs=build["max_num_seqs"]), name=DEPLOYMENT, route_prefix="/")
        # (after ray.init, which installs handlers of its own that end the process at once)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        print(f"specdec serve: {replicas} replicas on http://{host}:{port} (Ray Serve)", flush=True)
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def merge_metrics(replicas: list[tuple[str, int, str]]) -> bytes:
    """Prometheus text of several replicas (name, PID, text) as one: each sample labelled with its replica,
    each family once, and ``specdec_replica_info{replica, pid}`` naming each replica's process."""
    info = Metric("specdec_replica_info", "A replica of the deployment and its process", "gauge")
    families = {}
    for name, pid, text in replicas:
        info.add_sample("specdec_replica_info", {"replica": name, "pid": str(pid)}, 1.0)
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": name}, sample.value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([info, *families.values()]))
    return generate_latest(registry)


class _Fixed:
    """A collector of metric families already gathered."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families
