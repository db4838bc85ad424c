"""The docker/ deployment: its files agree with each other and with the project, and the instance it
configures really works on Postgres.

The static tests read the files (and let docker-compose validate the compose file where it is installed).
The ``deploy`` test starts a real Postgres 15 from the distribution's binaries, loads the instance from
docker/dagster.yaml, serves definitions.py over gRPC as the user_code service does, and lets a daemon
dequeue a launched run that the gRPC server executes: the run and its materialisation end up in Postgres.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from resources.deepspeed import free_port
from tests.conftest import ROOT

DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
COMPOSE_BIN = "/usr/bin/docker-compose"
POSTGRES_ENV = ("DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD", "DAGSTER_POSTGRES_HOSTNAME",
                "DAGSTER_POSTGRES_DB", "DAGSTER_POSTGRES_PORT")
# keys of docker/dagster.yaml that only a deployment has; every other key is the root dagster.yaml's
DEPLOYMENT_KEYS = {"storage", "run_coordinator", "run_launcher"}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _services() -> dict:
    return _yaml(DOCKER / "docker-compose.yml")["services"]


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    """``name==X`` as pyproject.toml pins it."""
    for dep in _pyproject()["project"]["dependencies"]:
        if re.fullmatch(rf"{re.escape(name)}==[\w.]+", dep.split(";")[0].strip()):
            return dep.strip()
    raise AssertionError(f"pyproject.toml does not pin {name}")


# ------------------------------------------------------------------------------------------ static


def test_compose_runs_each_service_with_its_command():
    services = _services()
    assert set(services) == {"postgres", "user_code", "webserver", "daemon"}

    pg = services["postgres"]
    assert pg["image"] == "postgres:15"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.split(":")[0] in _yaml(DOCKER / "docker-compose.yml")["volumes"] for v in pg["volumes"]), \
        "postgres keeps its data on a named volume"

    assert services["user_code"]["command"] == ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "4000", "-m",
                                                "definitions"]
    assert services["user_code"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["webserver"]["command"] == ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w",
                                                "workspace.yaml"]
    assert any(str(p).endswith(":3000") for p in services["webserver"]["ports"])
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]

    for name in ("user_code", "webserver", "daemon"):
        svc = services[name]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert set(POSTGRES_ENV) <= set(svc["environment"]), name
        home = svc["environment"]["DAGSTER_HOME"]
        assert any(v.startswith("./dagster.yaml:") and v.split(":")[1] == f"{home}/dagster.yaml" for v in svc["volumes"]), name
    for name in ("webserver", "daemon"):  # they read workspace.yaml from their working directory, DAGSTER_HOME
        svc = services[name]
        assert svc["working_dir"] == svc["environment"]["DAGSTER_HOME"]
        assert f"./workspace.yaml:{svc['working_dir']}/workspace.yaml:ro" in svc["volumes"]

    code_env = services["user_code"]["environment"]
    assert {"SLEEP_PIPELINE_HOME", "SLEEP_PIPELINE_RECIPES"} <= set(code_env)
    assert any(v.endswith(":" + code_env["SLEEP_PIPELINE_HOME"]) for v in services["user_code"]["volumes"]), \
        "the storage dir lives on a volume"


def test_the_postgres_password_comes_only_from_the_environment():
    # every password-like setting in the compose file is a required variable, never a value
    for name, svc in _services().items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{DAGSTER_POSTGRES_PASSWORD:\?[^}]+\}", str(value)), f"{name}: {key}={value}"
    db = _yaml(DOCKER / "dagster.yaml")["storage"]["postgres"]["postgres_db"]
    assert db["password"] == {"env": "DAGSTER_POSTGRES_PASSWORD"}

    # and no file of docker/ but the example holds a literal one (the example's placeholder included)
    placeholder = _env_example()["DAGSTER_POSTGRES_PASSWORD"]
    literal = re.compile(r"(?i)(?:^|[\s'\"])\w*password\w*\s*[:=]\s*(?![\s'\"]*(\$\{|\{|$))")
    for path in sorted(p for p in DOCKER.rglob("*") if p.is_file() and p.name not in (".env.example", ".env")):
        text = path.read_text()
        assert placeholder not in text, path
        assert not [line for line in text.splitlines() if literal.search(line)], path


@pytest.mark.skipif(not Path(COMPOSE_BIN).exists() and not os.environ.get("CI"),  # CI installs it: there, missing fails
                    reason=f"{COMPOSE_BIN} is not installed (apt-get install docker-compose)")
def test_docker_compose_validates_the_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SLEEP_PIPELINE_", "COMPOSE_"))}
    base = [COMPOSE_BIN, "-f", str(DOCKER / "docker-compose.yml")]
    gpu = base + ["-f", str(DOCKER / "docker-compose.gpu.yml")]
    for cmd in (base, gpu):
        done = subprocess.run([*cmd, "--env-file", str(DOCKER / ".env.example"), "config", "-q"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    # without the password, compose refuses to start anything
    (tmp_path / "empty.env").write_text("")
    done = subprocess.run([*base, "--env-file", str(tmp_path / "empty.env"), "config", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DAGSTER_POSTGRES" in done.stderr, done.stderr


def test_workspace_loads_the_user_code_grpc_server():
    (entry,) = _yaml(DOCKER / "workspace.yaml")["load_from"]
    server = _services()["user_code"]["command"]
    assert entry == {"grpc_server": {"host": "user_code", "port": int(server[server.index("-p") + 1]),
                                     "location_name": _pyproject()["tool"]["dagster"]["code_location_name"]}}


def test_deployment_instance_has_the_root_instance_settings():
    root, deployed = _yaml(ROOT / "dagster.yaml"), _yaml(DOCKER / "dagster.yaml")
    assert "concurrency" in root
    for key in ("concurrency", "run_monitoring"):
        assert deployed.get(key) == root.get(key), f"docker/dagster.yaml's {key} differs from dagster.yaml's"
    assert {k: v for k, v in deployed.items() if k not in DEPLOYMENT_KEYS} == root

    db = dict(deployed["storage"]["postgres"]["postgres_db"])
    # the driver that dagster-postgres depends on, whatever SQLAlchemy's default for postgresql:// is
    assert db.pop("scheme") == "postgresql+psycopg2"
    assert db == {field: {"env": f"DAGSTER_POSTGRES_{name}"} for field, name in
                  (("username", "USER"), ("password", "PASSWORD"), ("hostname", "HOSTNAME"), ("db_name", "DB"),
                   ("port", "PORT"))}
    assert deployed["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert deployed["run_launcher"]["class"] == "DefaultRunLauncher"


def test_images_install_the_project_at_its_pins():
    cpu, worker = (DOCKER / "Dockerfile").read_text(), (DOCKER / "Dockerfile.worker").read_text()
    torch, deepspeed = _pin("torch"), _pin("deepspeed")
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", cpu, re.M)
    assert re.search(rf'pip install "{re.escape(torch)}" --index-url https://download.pytorch.org/whl/cpu', cpu)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-devel-ubuntu", worker, re.M)
    # the CUDA build of torch matches the toolkit of the image (DeepSpeed compiles its ops with its nvcc)
    cuda = re.search(r"nvidia/cuda:12\.(\d+)", worker).group(1)
    assert re.search(rf"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu12{cuda}$", worker, re.M)
    assert f'pip install "{torch}" --index-url "${{TORCH_INDEX_URL}}"' in worker
    assert "openssh-server" in worker and "pdsh" in worker
    # DS_ACCELERATOR only for building DeepSpeed; at run time DeepSpeed detects cuda on a worker
    assert [m.group(1) for m in re.finditer(r"DS_ACCELERATOR=(\S+)", worker)] == ["cuda"]
    assert re.search(r"DS_ACCELERATOR=cuda pip install --no-build-isolation", worker)
    for text in (cpu, worker):
        assert f'"{deepspeed}"' in text
        # torch from its own index comes before the project, so `pip install .` keeps that build
        assert text.index(torch) < text.index("pip install .")
        assert re.search(r"^USER (?!root)\w+", text, re.M) or "sshd" in text
        assert "WORKDIR /opt/sleep-pipeline" in text
        copied = " ".join(line for line in text.splitlines() if line.startswith("COPY"))
        setuptools = _pyproject()["tool"]["setuptools"]
        needed = ["pyproject.toml", _pyproject()["project"]["readme"], "recipes", "workspace.yaml",
                  *(f"{m}.py" for m in setuptools["py-modules"]),
                  *(p.rstrip("*") for p in setuptools["packages"]["find"]["include"])]
        assert all(re.search(rf"(^|\s){re.escape(n)}(\s|$)", copied) for n in needed), (needed, copied)
    assert re.search(r"^USER dagster$", cpu, re.M)


def test_readme_rollback_command_is_the_cli_syntax():
    from assets.release import rollback_release
    from sleep_pipeline.cli import build_parser

    readme = (DOCKER / "README.md").read_text()
    commands = re.findall(r"sleep-pipeline (release rollback[^`\n]*)", readme)
    assert commands
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        assert args.release_command == "rollback"
    assert rollback_release.name in readme


# ------------------------------------------------------------------------------------------ deploy


def _postgres_bin() -> Path | None:
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").exists()
             and (Path(d) / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name)) if found else None


@contextmanager
def _postgres():
    """A throwaway Postgres server on a free port: (port, user, password); run as the `postgres` user when root."""
    pg_bin = _postgres_bin()
    if pg_bin is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    # not under pytest's tmp dir: that one is private to this user, and the server may run as another
    base = Path(tempfile.mkdtemp(prefix="sleep-pipeline-pg-"))
    user, password, port = "dagster", secrets.token_urlsafe(16), free_port()
    (base / "pwfile").write_text(password + "\n")
    if owner:
        for p in (base, base / "pwfile"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    data = base / "data"
    try:
        subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-U", user, f"--pwfile={base / 'pwfile'}",
                        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
                                  "-o", opts, "-w", "-t", "60", "start"], capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
            pytest.fail(f"postgres did not start: {started.stderr}\n{log[-2000:]}")
        yield port, user, password
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """TERM the process group (a server and the runs it started), KILL what is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.deploy
@pytest.mark.timeout(300)
def test_deployment_instance_runs_a_job_on_postgres(tmp_path, monkeypatch, storage, recipes_dir):
    import psycopg2
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus
    from dagster._core.launcher import DefaultRunLauncher
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    t0 = time.monotonic()
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DOCKER / "dagster.yaml", home / "dagster.yaml")
    grpc_port = free_port()
    # docker/workspace.yaml with this machine's address for the user_code service
    workspace = _yaml(DOCKER / "workspace.yaml")
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=grpc_port)
    (home / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    location = workspace["load_from"][0]["grpc_server"]["location_name"]

    procs: list[subprocess.Popen] = []
    instance = None
    with _postgres() as (pg_port, pg_user, pg_password):
        connect = dict(host="127.0.0.1", port=pg_port, user=pg_user, password=pg_password)
        con = psycopg2.connect(dbname="postgres", **connect)
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE sleep_pipeline")
        con.close()
        env_vars = {"DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_HOSTNAME": "127.0.0.1",
                    "DAGSTER_POSTGRES_PORT": str(pg_port), "DAGSTER_POSTGRES_USER": pg_user,
                    "DAGSTER_POSTGRES_PASSWORD": pg_password, "DAGSTER_POSTGRES_DB": "sleep_pipeline",
                    "SLEEP_PIPELINE_HOME": str(storage), "SLEEP_PIPELINE_RECIPES": str(recipes_dir)}
        for k, v in env_vars.items():
            monkeypatch.setenv(k, v)
        env = {**os.environ, **env_vars}
        timings: dict[str, float] = {"postgres_s": time.monotonic() - t0}
        try:
            # (1) the instance of docker/dagster.yaml, on Postgres
            instance = DagsterInstance.get()
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
            assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
            assert isinstance(instance.run_launcher, DefaultRunLauncher)

            # (2) the user_code service: definitions.py over gRPC
            t = time.monotonic()
            server = _start([str(BIN / "dagster"), "api", "grpc", "-m", "definitions", "-h", "127.0.0.1",
                             "-p", str(grpc_port)], ROOT, env, tmp_path / "grpc.log")
            procs.append(server)
            deadline = time.monotonic() + 120
            while True:
                check = subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(grpc_port)],
                                       env=env, capture_output=True, text=True, timeout=60)
                if check.returncode == 0:
                    break
                if server.poll() is not None:
                    pytest.fail(f"the gRPC server exited ({server.returncode}):\n{_tail(tmp_path / 'grpc.log')}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the gRPC server is not healthy after 120 s:\n{_tail(tmp_path / 'grpc.log')}")
                time.sleep(1)
            timings["grpc_healthy_s"] = time.monotonic() - t

            # (3) the daemon service dequeues a launched run; the gRPC server executes it
            t = time.monotonic()
            procs.append(_start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], home, env,
                                tmp_path / "daemon.log"))
            run_id = str(uuid.uuid4())
            launch = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", str(home / "workspace.yaml"),
                                     "-l", location, "-j", "sleep_cycle", "-o", "raw__curated_tasks",
                                     "--run-id", run_id], cwd=home, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert launch.returncode == 0, launch.stdout + launch.stderr
            con = psycopg2.connect(dbname="sleep_pipeline", **connect)
            con.autocommit = True
            status, deadline = None, time.monotonic() + 150
            with con.cursor() as cur:
                while time.monotonic() < deadline:
                    cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
                    row = cur.fetchone()
                    status = row and row[0]
                    if status in ("SUCCESS", "FAILURE", "CANCELED"):
                        break
                    time.sleep(1)
                timings["run_s"] = time.monotonic() - t
                assert status == "SUCCESS", (f"run {run_id}: {status}\n--- daemon\n{_tail(tmp_path / 'daemon.log')}"
                                             f"\n--- grpc\n{_tail(tmp_path / 'grpc.log')}")
                cur.execute("SELECT dagster_event_type FROM event_logs WHERE run_id = %s AND dagster_event_type IS NOT NULL"
                            " ORDER BY id", (run_id,))
                events = [r[0] for r in cur.fetchall()]
                cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s"
                            " AND asset_key = %s", (run_id, "ASSET_MATERIALIZATION",
                                                    AssetKey(["raw", "curated_tasks"]).to_string()))
                materializations = cur.fetchone()[0]
            con.close()
            # queued by the coordinator, launched by the daemon (through the code server), then run
            assert events.index("PIPELINE_ENQUEUED") < events.index("PIPELINE_STARTING") < events.index("PIPELINE_START")
            assert materializations == 1
            run = instance.get_run_by_id(run_id)
            assert run.status == DagsterRunStatus.SUCCESS and run.job_name == "sleep_cycle"
            latest = instance.get_latest_materialization_event(AssetKey(["raw", "curated_tasks"]))
            assert latest is not None and latest.run_id == run_id
            assert latest.asset_materialization.metadata["dagster/row_count"].value > 0
        finally:
            if instance is not None:
                instance.dispose()
            for proc in reversed(procs):
                _stop(proc)
    print(f"deploy timings: { {k: round(v, 1) for k, v in timings.items()} } total {time.monotonic() - t0:.1f} s")
