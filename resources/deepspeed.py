"""DeepSpeedClusterResource: launch an engine worker with the real ``deepspeed`` launcher, through Pipes.

The same resource serves a laptop (CPU ranks over gloo, ``DS_ACCELERATOR=cpu``), one GPU box, and a
multi-node cluster (a hostfile with ``--num_nodes`` / ``--master_addr`` and a pdsh, openmpi, mvapich,
impi or slurm launcher); only configuration differs. The worker reports logs, per-step metrics and its
materialisation through Dagster Pipes. The launcher runs in its own process group (session), and an
interrupted or cancelled run terminates the whole group (TERM, then KILL after a grace period), so no
rank keeps training after the run is gone.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from sleep_pipeline.train.shm import release_run_segments

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "impi", "mpich")


class DeepSpeedLaunchError(RuntimeError):
    """The launcher or a rank exited with an error."""


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reported_checkpoint(results: list, worker: str) -> tuple[dict, Path]:
    """What a worker reported through Pipes (its materialisation metadata, merged) and the checkpoint it
    published; a ``dg.Failure`` naming ``worker`` when it finished without reporting one."""
    reported: dict = {}
    for r in results:
        reported.update(r.metadata or {})
    if "checkpoint" not in reported:
        raise dg.Failure(f"the {worker} finished without reporting a checkpoint")
    return reported, Path(str(getattr(reported["checkpoint"], "value", reported["checkpoint"])))


class DeepSpeedClusterResource(dg.ConfigurableResource):
    """Where and how training-type work runs. Secrets (e.g. a cluster token) go in ``env`` through
    ``dg.EnvVar`` and are passed to the launcher's environment, never on its command line."""

    accelerator: str = Field(default="cpu", description="cpu (gloo) or cuda")
    num_gpus: int = Field(default=2, description="ranks per node: GPUs, or CPU processes when accelerator=cpu")
    num_nodes: int = Field(default=1, description="nodes; more than 1 needs a hostfile")
    hostfile: Optional[str] = Field(default=None, description="DeepSpeed hostfile ('host slots=N' per line)")
    master_addr: Optional[str] = None
    master_port: Optional[int] = Field(default=None, description="None picks a free port per launch")
    launcher: Optional[str] = Field(default=None, description=f"multi-node launcher ({', '.join(LAUNCHERS)}); None = DeepSpeed's default (pdsh)")
    launcher_args: Optional[str] = Field(default=None, description="extra arguments for the multi-node launcher, e.g. srun options")
    include: Optional[str] = Field(default=None, description="host/GPU selection, e.g. 'worker-0:0,1@worker-1'")
    omp_num_threads: int = Field(default=1, description="OMP_NUM_THREADS per rank")
    deepspeed_bin: Optional[str] = Field(default=None, description="the deepspeed launcher; default: beside this Python")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the launcher and ranks")
    grace_period_s: float = 15.0
    shared_dir: Optional[str] = Field(
        default=None,
        description="multi-node: a directory every node sees at the same path (shared storage). The Dagster Pipes "
                    "context and message files, and the environment file DeepSpeed's multi-node launcher hands to "
                    "every node (DS_ENV_FILE), are written there; default: the storage directory")
    max_runtime_s: Optional[float] = Field(
        default=8 * 3600.0,
        description="the longest one launch (a training-type step) may run; past it the launcher's whole process "
                    "group is terminated and the step fails, resumable from its last intermediate checkpoint. "
                    "None: no limit (the run's dagster/max_runtime still applies)")

    def launcher_path(self) -> str:
        if self.deepspeed_bin:
            return self.deepspeed_bin
        beside = Path(sys.executable).parent / "deepspeed"
        return str(beside) if beside.exists() else (shutil.which("deepspeed") or "deepspeed")

    def build_command(self, module: str, args: list[str], master_port: Optional[int] = None) -> list[str]:
        """The exact ``deepspeed`` command line for running ``python -m module args`` on every rank."""
        if self.accelerator not in ("cpu", "cuda"):
            raise ValueError(f"accelerator must be 'cpu' or 'cuda', got {self.accelerator!r}")
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.num_gpus < 1 or self.num_nodes < 1:
            raise ValueError("num_gpus and num_nodes must be at least 1")
        if self.num_nodes > 1 and not self.hostfile:
            raise ValueError("num_nodes > 1 needs a hostfile (or a launcher that provides one)")
        cmd = [self.launcher_path()]
        if self.hostfile:
            cmd += ["--hostfile", self.hostfile]
        if self.include:
            cmd += ["--include", self.include]
        if self.num_nodes > 1:
            cmd += ["--num_nodes", str(self.num_nodes)]
        cmd += ["--num_gpus", str(self.num_gpus)]
        if self.master_addr:
            cmd += ["--master_addr", self.master_addr]
        port = master_port or self.master_port
        if port:
            cmd += ["--master_port", str(port)]
        if self.launcher:
            cmd += ["--launcher", self.launcher]
        if self.launcher_args:
            cmd += ["--launcher_args", self.launcher_args]
        cmd += ["--module", module, *args]
        return cmd

    def node_env(self, env: dict[str, str]) -> dict[str, str]:
        """What every rank on every node needs from the launching side's environment: DeepSpeed's pdsh
        launcher forwards only a few prefixes (NCCL, PYTHON, ...) plus its DS_ENV_FILE, so the Pipes
        bootstrap, the project's settings, the offline flags and the resource's own ``env`` go there.
        The watch pid is left out: the launching process lives on another node."""
        keep = ("DAGSTER_PIPES_", "SLEEP_PIPELINE_", "HF_", "OMP_NUM_THREADS", "DS_ACCELERATOR")
        out = {k: v for k, v in env.items() if k.startswith(keep) and k != "SLEEP_PIPELINE_WATCH_PID"}
        return {**out, **self.env}

    def launch_env(self) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.omp_num_threads), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **self.env}
        if self.accelerator == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        return env

    def run(self, context: dg.AssetExecutionContext, module: str, args: list[str],
            extras: Optional[dict[str, Any]] = None) -> list:
        """Launch, stream, wait; returns the Pipes results (the worker's reported materialisation)."""
        port = self.master_port or free_port()
        cmd = self.build_command(module, args, master_port=port)
        context.log.info("launching: " + " ".join(cmd))
        env_file: Optional[Path] = None  # DeepSpeed's DS_ENV_FILE for the other nodes
        if self.num_nodes > 1 or self.hostfile or self.shared_dir:
            # rank 0 may run on another node: Pipes talks through files on shared storage
            shared = Path(self.shared_dir or os.environ.get("SLEEP_PIPELINE_HOME") or ".").resolve() / "pipes" / context.run.run_id
            shared.mkdir(parents=True, exist_ok=True)
            launch = shared / f"launch-{port}"
            injector = dg.PipesFileContextInjector(f"{launch}.context.json")
            reader = dg.PipesFileMessageReader(f"{launch}.messages.jsonl")
            env_file = Path(f"{launch}.deepspeed_env")
        else:
            injector, reader = dg.PipesTempFileContextInjector(), dg.PipesTempFileMessageReader()
        with dg.open_pipes_session(context=context, context_injector=injector, message_reader=reader,
                                   extras=extras or {}) as session:
            # The ranks watch this process: if it is killed outright they stop too.
            env = {**self.launch_env(), **session.get_bootstrap_env_vars(), "SLEEP_PIPELINE_WATCH_PID": str(os.getpid())}
            if env_file is not None:
                env["DS_ENV_FILE"] = str(write_node_env(env_file, self.node_env(env)))
            # Own session = own process group: the launcher and every rank can be signalled together.
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            try:
                returncode = proc.wait(timeout=self.max_runtime_s)
            except subprocess.TimeoutExpired:
                context.log.error(f"the launch passed its maximum runtime of {self.max_runtime_s:.0f} s: "
                                  f"terminating launcher process group {proc.pid}")
                terminate_group(proc, self.grace_period_s)
                raise dg.Failure(
                    f"training step exceeded its maximum runtime of {self.max_runtime_s:.0f} s (deepspeed.max_runtime_s) "
                    "and was terminated; launching it again resumes from its last intermediate checkpoint",
                    allow_retries=False) from None
            except BaseException:
                context.log.warning(f"run interrupted: terminating launcher process group {proc.pid}")
                terminate_group(proc, self.grace_period_s)
                raise
            finally:
                # a run that died before its ranks released them leaves DeepSpeed's all-reduce buffers
                release_run_segments(addr="*", port=port)
                if env_file is not None:  # it carries the Pipes bootstrap and the resource's secrets
                    env_file.unlink(missing_ok=True)
            if returncode != 0:
                raise DeepSpeedLaunchError(f"deepspeed exited with code {returncode}; the worker's error is in the run log above")
        return list(session.get_results())


def write_node_env(path: Path, env: dict[str, str]) -> Path:
    """DeepSpeed's environment file (``KEY=value`` per line, read on the launching node and exported on
    every node); a value with a line break cannot be carried and is refused."""
    bad = [k for k, v in env.items() if "\n" in v or "\r" in v]
    if bad:
        raise ValueError(f"environment values with line breaks cannot reach the other nodes: {', '.join(bad)}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())), encoding="utf-8")
    os.chmod(tmp, 0o600)  # it can hold the resource's secrets
    os.replace(tmp, path)
    return path


def terminate_group(proc: subprocess.Popen, grace_period_s: float) -> None:
    """TERM the process group, wait, then KILL whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_period_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
