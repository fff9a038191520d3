#!/usr/bin/env python3
"""Flower 1.41 baseline for greyfed: FedAvg (optionally SecAgg+) on mnist-10k.

Mirrors `greyfed simulate --data DIR --participants 10 --rounds 10` with its
defaults (see README "Measured" and `greyfed simulate --help`):

- data: the IDX .gz files of DIR (7,000 training, 1,500 test images),
  pixels scaled to [-1, 1]; training split cut IID into N shards (a seeded
  permutation cut into contiguous chunks whose sizes differ by at most one,
  700 images each for N = 10), test split likewise (150 each) for federated
  evaluation (the sample-weighted mean of the participants' accuracies; the
  shards cover the test split exactly once);
- model: blocknet (conv kernel = stride = 4, 1 -> 32 channels, ReLU,
  flatten, Linear(32*49 -> 256), ReLU, Linear(256 -> 10)), 404,778 parameters,
  PyTorch default initialisation (seeded) on the server;
- local training: SGD lr 0.1, momentum 0.9 (buffer reset every round),
  batch 32 (last partial batch kept), 5 local epochs, reshuffled every epoch;
- server: FedAvg weighted by sample count, every participant trains and
  evaluates every round; 10 rounds;
- `--secagg`: Flower's SecAgg+ (`SecAggPlusWorkflow` + `secaggplus_mod`) with
  num_shares = 10 (= greyfed's complete graph for 10 participants: 9
  neighbours + self) and reconstruction_threshold = 5 (greyfed's t = 5); the
  quantisation settings are Flower's defaults (clip 8, 2^22 levels, 2^32 ring).
  greyfed's evaluation is a second secure sum; Flower's evaluation metrics
  are not securely aggregated (Flower has no workflow for that).

Two engines (`--engine`):

- `deployment` (default): one `flower-superlink`, N `flower-supernode`s (all
  `--insecure`, on 127.0.0.1) and `flwr run` as separate processes; the
  SuperLink starts the ServerApp and every SuperNode its ClientApps through
  `flower-superexec` (isolation "subprocess", Flower's default). The app
  (this file plus a generated pyproject.toml) is written to a temporary
  directory and shipped as a FAB by `flwr run`. In Flower 1.41 a SuperNode
  starts a fresh `flwr-clientapp` process for every message (it installs the
  FAB, imports the app, handles one message and exits): with SecAgg+ that
  is 5 processes per participant and round (4 SecAgg+ stages + evaluation),
  2 without.
- `simulation`: Flower's simulation engine (`flwr.simulation.run_simulation`:
  the ServerApp in a thread, in-memory SuperLink state, virtual SuperNodes)
  with warm worker processes that load the ClientApp once, as Ray actors do.
  Flower's only backend is Ray, which is not installed here, so a small
  process-pool backend (Flower's `Backend` interface) stands in for it;
  `--workers` (default: min(N, CPUs)) of them.

Measured: wall time until the ServerApp has finished round R's evaluation,
from launching the SuperLink (deployment) or from the start of this Python
process (simulation, where this process is the engine and the ServerApp);
per-round times (from the ServerApp: configure_fit -> aggregated
evaluation); final federated accuracy; the peak of the RSS (and PSS) summed
over every process of the run, sampled every 100 ms from /proc by
bench/procmem.py (deployment: the launcher itself is excluded; simulation:
included); CPU time summed over those processes; and the wire size of the
masked vectors (measured in the ClientApp by a mod around `secaggplus_mod`:
serialized size of the record that carries them, divided by the number of
masked elements) and of every reply.

Usage:
    python bench/flower_fedavg.py --data ../shared/data/mnist-10k [--secagg] \
        [--engine deployment|simulation] [--rounds 10] [--participants 10] \
        [--out DIR] [--json out.json]
Exit status 3 (with a SKIP message) when flwr is not importable, 4 when the
data directory is missing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------
# Data and model (used inside the ServerApp and ClientApp processes)
# --------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {data_dir}")


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, 1, 28, 28] in [-1, 1], labels int64 [N]."""
    d = Path(data_dir)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))
    x = images.astype(np.float32)[:, None, :, :] / 127.5 - 1.0
    return x, labels.astype(np.int64)


def iid_shard(n: int, index: int, parts: int, seed: int) -> np.ndarray:
    """A seeded permutation cut into contiguous chunks (sizes differ <= 1)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.array_split(perm, parts)[index]


def make_model(block: int = 4, channels: int = 32, hidden: int = 256, classes: int = 10):
    import torch.nn as nn

    grid = 28 // block
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=block, stride=block),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * grid * grid, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def get_weights(model) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model, weights: list[np.ndarray]) -> None:
    import torch

    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights)})


# --------------------------------------------------------------------------
# Flower apps (imported by the ServerApp / ClientApp processes from the FAB)
# --------------------------------------------------------------------------

try:
    import flwr  # noqa: F401

    HAVE_FLWR = True
except ImportError:  # the launcher reports this
    HAVE_FLWR = False

_CACHE: dict = {}
CONFIG_ENV = "GREYFED_FLOWER_BENCH_CONFIG"


def bench_config(context) -> dict:
    """The run's settings: the run config (deployment: pyproject.toml's
    [tool.flwr.app.config]) or, in the simulation engine, which has no run
    config, the JSON in $GREYFED_FLOWER_BENCH_CONFIG."""
    rc = context.run_config
    if "rounds" in rc:
        return rc
    return json.loads(os.environ.get(CONFIG_ENV, "{}"))


def _wire_size(obj, seen: set) -> int:
    """Serialized size of an inflatable Flower object and its children."""
    oid = obj.object_id
    if oid in seen:
        return 0
    seen.add(oid)
    size = len(obj.deflate())
    for child in (obj.children or {}).values():
        size += _wire_size(child, seen)
    return size


if HAVE_FLWR:
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import Key as _SecAggKey

    MASKED_PARAMETERS_KEY = _SecAggKey.MASKED_PARAMETERS  # "masked_params"
    from flwr.serverapp import ServerApp

    class BenchClient(NumPyClient):
        def __init__(self, context) -> None:
            import torch

            torch.set_num_threads(1)
            rc = bench_config(context)
            idx = int(context.node_config["partition-id"])
            parts = int(context.node_config["num-partitions"])
            key = (rc["data"], idx, parts)
            if key not in _CACHE:
                seed = int(rc["data-seed"])
                xtr, ytr = load_split(rc["data"], "train")
                xte, yte = load_split(rc["data"], "test")
                tr = iid_shard(len(ytr), idx, parts, seed)
                te = iid_shard(len(yte), idx, parts, seed ^ 0x7E57)
                _CACHE[key] = (
                    torch.from_numpy(xtr[tr].copy()),
                    torch.from_numpy(ytr[tr].copy()),
                    torch.from_numpy(xte[te].copy()),
                    torch.from_numpy(yte[te].copy()),
                )
            self.xtr, self.ytr, self.xte, self.yte = _CACHE[key]
            self.idx = idx
            self.rc = rc
            self.model = make_model()

        def get_parameters(self, config):
            return get_weights(self.model)

        def fit(self, parameters, config):
            import torch
            import torch.nn.functional as F

            set_weights(self.model, parameters)
            rnd = int(config.get("server_round", 0))
            gen = torch.Generator().manual_seed(
                int(self.rc["seed"]) * 1_000_003 + self.idx * 1009 + rnd
            )
            opt = torch.optim.SGD(
                self.model.parameters(),
                lr=float(self.rc["lr"]),
                momentum=float(self.rc["momentum"]),
            )
            bs = int(self.rc["batch-size"])
            n = len(self.ytr)
            self.model.train()
            total, count = 0.0, 0
            for _ in range(int(self.rc["local-epochs"])):
                order = torch.randperm(n, generator=gen)
                for s in range(0, n, bs):
                    b = order[s : s + bs]
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(self.model(self.xtr[b]), self.ytr[b])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                    count += len(b)
            return get_weights(self.model), n, {"train_loss": total / max(count, 1)}

        def evaluate(self, parameters, config):
            import torch
            import torch.nn.functional as F

            set_weights(self.model, parameters)
            self.model.eval()
            with torch.no_grad():
                logits = self.model(self.xte)
                loss = float(F.cross_entropy(logits, self.yte))
                acc = float((logits.argmax(1) == self.yte).float().mean())
            return loss, len(self.yte), {"accuracy": acc}

    def _client_fn(context):
        return BenchClient(context).to_client()

    def wire_mod(msg, ctx, call_next):
        """Records the serialized size of every reply, and of masked vectors."""
        reply = call_next(msg, ctx)
        out = bench_config(ctx).get("out-dir", "")
        if not out:
            return reply
        try:
            rec = {
                "node": int(ctx.node_config["partition-id"]),
                "type": msg.metadata.message_type,
                "reply_bytes": _wire_size(reply, set()) if reply.has_content() else 0,
            }
            if reply.has_content():
                content = reply.content
                for name, cfg in content.config_records.items():
                    masked = cfg.get(MASKED_PARAMETERS_KEY)
                    if masked is not None:
                        from flwr.common import bytes_to_ndarray

                        arrays = [bytes_to_ndarray(b) for b in masked]
                        rec["masked_elements"] = int(sum(a.size for a in arrays))
                        rec["masked_dtype"] = str(arrays[0].dtype)
                        rec["masked_payload_bytes"] = int(sum(len(b) for b in masked))
                        rec["masked_record_bytes"] = len(cfg.deflate())
                for name, arr_rec in content.array_records.items():
                    from flwr.common import bytes_to_ndarray

                    for a in arr_rec.values():
                        if a.dtype and a.shape:
                            elems, dtype = int(np.prod(a.shape)), a.dtype
                        else:  # legacy Parameters: serialized .npy bytes
                            nd = bytes_to_ndarray(a.data)
                            elems, dtype = int(nd.size), str(nd.dtype)
                        rec["array_elements"] = rec.get("array_elements", 0) + elems
                        rec.setdefault("array_dtypes", [])
                        if dtype not in rec["array_dtypes"]:
                            rec["array_dtypes"].append(dtype)
            with open(os.path.join(out, f"wire-{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        except Exception as e:  # measurement must never break the run
            with open(os.path.join(out, f"wire-{os.getpid()}.err"), "a") as f:
                f.write(repr(e) + "\n")
        return reply

    def secagg_if_configured_mod(msg, ctx, call_next):
        """`secaggplus_mod` when the run uses SecAgg+ (the run config is not
        known when the ClientApp is built), otherwise nothing."""
        if bool(bench_config(ctx).get("secagg", False)):
            return secaggplus_mod(msg, ctx, call_next)
        return call_next(msg, ctx)

    def _make_clientapp():
        return ClientApp(client_fn=_client_fn, mods=[wire_mod, secagg_if_configured_mod])

    clientapp = _make_clientapp()
    serverapp = ServerApp()

    @serverapp.main()
    def _server_main(grid, context) -> None:
        import torch
        from flwr.common import Metrics, ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.strategy import FedAvg
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        torch.set_num_threads(1)
        rc = bench_config(context)
        n = int(rc["participants"])
        rounds = int(rc["rounds"])
        torch.manual_seed(int(rc["seed"]))
        init = get_weights(make_model())
        log: dict = {"rounds": [], "t_start": time.time()}

        def weighted(metrics: list[tuple[int, Metrics]]) -> Metrics:
            total = sum(k for k, _ in metrics)
            out = {}
            for key in metrics[0][1] if metrics else []:
                out[key] = sum(k * m[key] for k, m in metrics) / total
            return out

        class TimedFedAvg(FedAvg):
            def configure_fit(self, server_round, parameters, client_manager):
                log["rounds"].append({"round": server_round, "t0": time.time()})
                return super().configure_fit(server_round, parameters, client_manager)

            def aggregate_fit(self, server_round, results, failures):
                log["rounds"][-1]["t_fit"] = time.time()
                log["rounds"][-1]["fit_results"] = len(results)
                log["rounds"][-1]["fit_failures"] = len(failures)
                return super().aggregate_fit(server_round, results, failures)

            def aggregate_evaluate(self, server_round, results, failures):
                res = super().aggregate_evaluate(server_round, results, failures)
                r = log["rounds"][-1]
                r["t1"] = time.time()
                r["secs"] = r["t1"] - r["t0"]
                r["loss"] = res[0]
                r["accuracy"] = res[1].get("accuracy")
                r["evaluators"] = len(results)
                _dump()
                return res

        def _dump() -> None:
            path = os.path.join(rc["out-dir"], "server.json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(log, f)
            os.replace(tmp, path)

        strategy = TimedFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=n,
            min_evaluate_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(init),
            on_fit_config_fn=lambda rnd: {"server_round": rnd},
            evaluate_metrics_aggregation_fn=weighted,
            fit_metrics_aggregation_fn=weighted,
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        if bool(rc["secagg"]):
            fit_workflow = SecAggPlusWorkflow(
                num_shares=int(rc["num-shares"]),
                reconstruction_threshold=int(rc["reconstruction-threshold"]),
                max_weight=float(rc["max-weight"]),
            )
        else:
            fit_workflow = None
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        log["t_end"] = time.time()
        log["done"] = True
        _dump()


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "greyfedflowerbench"
version = "1.0.0"
description = "Flower FedAvg/SecAgg+ baseline for greyfed"
license = "Apache-2.0"
dependencies = ["flwr>=1.41", "torch", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "greyfed"

[tool.flwr.app.components]
serverapp = "flower_fedavg:serverapp"
clientapp = "flower_fedavg:clientapp"

[tool.flwr.app.config]
{config}
"""


def _free_ports(k: int) -> list[int]:
    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _wait_port(port: int, timeout: float, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited early with {p.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open in {timeout} s")


def _summarise_wire(out: Path) -> dict:
    recs = []
    for f in sorted(out.glob("wire-*.jsonl")):
        recs += [json.loads(line) for line in f.read_text().splitlines() if line]
    errs = [f.read_text() for f in out.glob("wire-*.err")]
    res: dict = {"messages": len(recs)}
    if errs:
        res["errors"] = errs[:3]
    masked = [r for r in recs if "masked_elements" in r]
    if masked:
        el = sum(r["masked_elements"] for r in masked)
        res["masked_dtype"] = masked[0]["masked_dtype"]
        res["masked_elements_per_upload"] = masked[0]["masked_elements"]
        res["masked_bytes_per_element_payload"] = sum(
            r["masked_payload_bytes"] for r in masked
        ) / el
        res["masked_bytes_per_element_record"] = sum(
            r["masked_record_bytes"] for r in masked
        ) / el
        res["masked_bytes_per_element_message"] = sum(r["reply_bytes"] for r in masked) / el
    fits = [r for r in recs if r.get("array_elements") and r["type"] == "train"]
    if fits:
        el = sum(r["array_elements"] for r in fits)
        res["plain_fit_dtypes"] = fits[0]["array_dtypes"]
        res["plain_fit_bytes_per_element_message"] = sum(r["reply_bytes"] for r in fits) / el
    # Everything the clients sent, per client and round.
    res["reply_bytes_total"] = sum(r["reply_bytes"] for r in recs)
    by_type: dict = {}
    for r in recs:
        by_type[r["type"]] = by_type.get(r["type"], 0) + r["reply_bytes"]
    res["reply_bytes_by_type"] = by_type
    return res


def make_config(args, out: Path) -> dict:
    return {
        "data": str(Path(args.data).resolve()),
        "rounds": args.rounds,
        "participants": args.participants,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "seed": args.seed,
        "data-seed": args.data_seed,
        "secagg": bool(args.secagg),
        "num-shares": args.num_shares,
        "reconstruction-threshold": args.reconstruction_threshold,
        "max-weight": args.max_weight,
        "out-dir": str(out),
    }


def _round_results(log: dict, t0_wall: float) -> dict:
    rounds = log["rounds"]
    return dict(
        wall_s=round(
            (rounds[-1]["t1"] if rounds and "t1" in rounds[-1] else log["t_end"]) - t0_wall, 3
        ),
        first_round_start_s=round(rounds[0]["t0"] - t0_wall, 3) if rounds else None,
        round_secs=[round(r.get("secs", float("nan")), 3) for r in rounds],
        accuracy=rounds[-1].get("accuracy") if rounds else None,
        accuracies=[r.get("accuracy") for r in rounds],
        fit_results=[r.get("fit_results") for r in rounds],
        fit_failures=[r.get("fit_failures") for r in rounds],
        evaluators=[r.get("evaluators") for r in rounds],
    )


def run_deployment(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import procmem

    work = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    out = Path(args.out).resolve() if args.out else work / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    app = work / "app"
    app.mkdir()
    shutil.copy(Path(__file__).resolve(), app / "flower_fedavg.py")
    config = make_config(args, out)
    (app / "pyproject.toml").write_text(
        PYPROJECT.format(config="\n".join(f"{k} = {_toml_value(v)}" for k, v in config.items()))
    )

    home = work / "flwr-home"
    home.mkdir()
    http, *node_ports = _free_ports(1 + args.participants)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{http}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # flower-superlink/-supernode start flower-superexec, flwr-serverapp
        # and flwr-clientapp by name.
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    )
    logs = out / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str], **kw) -> subprocess.Popen:
        f = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=work, **kw
        )
        procs.append(p)
        return p

    sampler = procmem.TreeSampler([os.getpid()], interval=0.1, include_roots=False)
    sampler.start()
    t0 = time.monotonic()
    t0_wall = time.time()
    result: dict = {
        "system": "flower",
        "engine": "deployment",
        "flwr": flwr.__version__,
        "secagg": bool(args.secagg),
    }
    try:
        link = spawn(
            "superlink",
            [
                _bin("flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(http),
            ],
        )
        # Flower 1.41 serves the Fleet, Control and Runtime APIs over HTTP on
        # one port.
        _wait_port(http, 120, [link])
        t_link = time.monotonic() - t0
        for i in range(args.participants):
            spawn(
                f"supernode-{i}",
                [
                    _bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{http}",
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(node_ports[i]),
                    "--node-config",
                    f"partition-id={i} num-partitions={args.participants}",
                ],
            )
        run = spawn("flwr-run", [_bin("flwr"), "run", str(app), "bench", "--stream"])
        server_json = out / "server.json"
        deadline = time.monotonic() + args.timeout
        done = False
        while time.monotonic() < deadline:
            if server_json.exists():
                try:
                    log = json.loads(server_json.read_text())
                except (json.JSONDecodeError, OSError):
                    log = {}
                if log.get("done"):
                    done = True
                    break
            if run.poll() is not None and run.returncode != 0:
                break
            for p in procs:
                if p.poll() is not None and p is not run:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {logs}")
            time.sleep(0.1)
        t_done = time.monotonic() - t0
        # `flwr run --stream` returns once the run has finished.
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        t_run_exit = time.monotonic() - t0
        if not done:
            raise RuntimeError(f"run did not finish (flwr run status {run.poll()}); see {logs}")
        log = json.loads(server_json.read_text())
        result.update(_round_results(log, t0_wall))
        result.update(
            wall_until_flwr_run_exits_s=round(t_run_exit, 3),
            wall_until_done_seen_s=round(t_done, 3),
            superlink_ready_s=round(t_link, 3),
        )
    finally:
        # Stop everything: the processes started here, then every descendant
        # still alive (SuperExec processes are detached from their parents),
        # SIGTERM then SIGKILL.
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        sampler.terminate_all(grace=10.0)
        mem = sampler.stop()
        result["wall_total_with_teardown_s"] = round(time.monotonic() - t0, 3)
        result["memory"] = mem
        result["peak_rss_sum_mb"] = mem["peak_rss_sum_mb"]
        result["peak_pss_sum_mb"] = mem["peak_pss_sum_mb"]
        result["cpu_s"] = mem["cpu_s"]
        result["out_dir"] = str(out)
    result["wire"] = _summarise_wire(out)
    if not args.keep:
        shutil.rmtree(work / "app", ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    return result


# -- Simulation engine with warm worker processes --------------------------
#
# Flower's simulation engine (`flwr.simulation.run_simulation`: in-memory
# SuperLink state, the ServerApp in a thread, virtual SuperNodes) hands each
# message to a `Backend`; the only backend Flower ships is Ray's (warm
# actors). Ray is not installed here, so `ProcessPoolBackend` stands in for
# it: the same Backend interface, `workers` long-lived processes that each
# load the ClientApp once and then run message after message (as Ray actors
# do), messages and contexts pickled over pipes.


def _reduce_memoryview(view):
    return memoryview, (view.tobytes(),)


def _register_pickling() -> None:
    """Flower's Arrays may hold memoryviews, which pickle cannot send."""
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(memoryview, _reduce_memoryview)


def _sim_worker(conn) -> None:
    """Body of a warm worker process: run the ClientApp on each message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _register_pickling()
    app = clientapp
    while True:
        item = conn.recv()
        if item is None:
            break
        message, context = item
        try:
            reply = app(message=message, context=context)
            conn.send((reply, context))
        except Exception as ex:  # reported to the engine like Ray's errors
            conn.send(ex)
    conn.close()


def _make_process_backend_class():
    import multiprocessing as mp
    import queue

    from flwr.server.superlink.fleet.vce.backend.backend import Backend

    class ProcessPoolBackend(Backend):
        def __init__(self, backend_config) -> None:
            super().__init__(backend_config)
            self.n = int(backend_config.get("init_args", {}).get("num_workers", 2))
            self.procs: list = []
            self.idle: "queue.Queue" = queue.Queue()

        def build(self, app_fn) -> None:
            _register_pickling()
            ctx = mp.get_context("spawn")
            for _ in range(self.n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_sim_worker, args=(child,), daemon=True)
                proc.start()
                child.close()
                self.procs.append((proc, parent))
                self.idle.put(parent)

        @property
        def num_workers(self) -> int:
            return self.n

        def is_worker_idle(self) -> bool:
            return not self.idle.empty()

        def terminate(self) -> None:
            for proc, conn in self.procs:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc, _ in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()

        def process_message(self, message, context):
            conn = self.idle.get()
            try:
                conn.send((message, context))
                res = conn.recv()
            finally:
                self.idle.put(conn)
            if isinstance(res, Exception):
                raise res
            return res

    return ProcessPoolBackend


def _process_start_wall() -> float:
    """Wall-clock time at which this process started (from /proc)."""
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
    btime = next(
        int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime")
    )
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


def run_simulation_engine(args) -> dict:
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import procmem

    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="flower-sim-"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = make_config(args, out)
    os.environ[CONFIG_ENV] = json.dumps(config)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    workers = args.workers = args.workers or min(args.participants, os.cpu_count() or 1)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

    # Flower's engine imports its Ray backend by this module name; give it
    # the process-pool backend instead (ray is not installed).
    fake = types.ModuleType("flwr.server.superlink.fleet.vce.backend.raybackend")
    fake.RayBackend = _make_process_backend_class()
    sys.modules[fake.__name__] = fake
    from flwr.simulation import run_simulation

    # This process is part of the Flower run (engine + ServerApp): count it.
    sampler = procmem.TreeSampler([os.getpid()], interval=0.1, include_roots=True)
    sampler.start()
    t0_wall = _process_start_wall()
    result: dict = {
        "system": "flower",
        "engine": f"simulation ({workers} warm worker processes, Ray replaced)",
        "workers": workers,
        "flwr": flwr.__version__,
        "secagg": bool(args.secagg),
    }
    try:
        run_simulation(
            server_app=serverapp,
            client_app=clientapp,
            num_supernodes=args.participants,
            backend_name="process-pool",
            backend_config={"init_args": {"num_workers": workers}},
        )
        log = json.loads((out / "server.json").read_text())
        if not log.get("done"):
            raise RuntimeError("the ServerApp did not finish")
        result.update(_round_results(log, t0_wall))
        result["python_start_to_run_s"] = round(log["t_start"] - t0_wall, 3)
    finally:
        sampler.terminate_all(grace=5.0)
        mem = sampler.stop()
        result["memory"] = mem
        result["peak_rss_sum_mb"] = mem["peak_rss_sum_mb"]
        result["peak_pss_sum_mb"] = mem["peak_pss_sum_mb"]
        result["cpu_s"] = mem["cpu_s"]
        result["out_dir"] = str(out)
    result["wire"] = _summarise_wire(out)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist-10k"))
    p.add_argument("--participants", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--secagg", action="store_true", help="SecAgg+ (SecAggPlusWorkflow)")
    p.add_argument("--num-shares", type=int, default=None, help="default: participants")
    p.add_argument("--reconstruction-threshold", type=int, default=None,
                   help="default: participants // 2 (greyfed's t for the complete graph)")
    p.add_argument("--max-weight", type=float, default=1000.0)
    p.add_argument("--timeout", type=float, default=7200,
                   help="seconds for the whole run (deployment)")
    p.add_argument("--engine", choices=("deployment", "simulation"), default="deployment",
                   help="deployment: SuperLink + SuperNodes + flwr run as separate processes; "
                   "simulation: Flower's simulation engine with warm worker processes")
    p.add_argument("--workers", type=int, default=0,
                   help="simulation: worker processes (default: min(participants, CPUs))")
    p.add_argument("--out", help="output directory (logs, server.json, wire-*.jsonl)")
    p.add_argument("--json", help="write the result here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the generated app directory")
    args = p.parse_args()
    if not HAVE_FLWR:
        print("SKIP: flwr is not importable with " + sys.executable, file=sys.stderr)
        return 3
    if args.num_shares is None:
        args.num_shares = args.participants
    if args.reconstruction_threshold is None:
        args.reconstruction_threshold = max(2, args.participants // 2)
    if not Path(args.data).is_dir():
        print(f"SKIP: data directory {args.data} not found", file=sys.stderr)
        return 4
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Clean up (finally blocks) on SIGTERM, and on SIGINT even when started
    # in the background (where SIGINT is inherited as ignored).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.engine == "deployment":
        result = run_deployment(args)
    else:
        result = run_simulation_engine(args)
    result["config"] = {
        k: getattr(args, k)
        for k in ("engine", "workers", "participants", "rounds", "local_epochs", "batch_size", "lr", "momentum",
                  "seed", "data_seed", "secagg", "num_shares", "reconstruction_threshold",
                  "max_weight")
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    brief = {k: v for k, v in result.items() if k not in ("memory",)}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
