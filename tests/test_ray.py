"""`compress --engine ray` (issue 15) against a real Ray head on 127.0.0.1 with two worker CPUs,
started by these tests (no mocks): the same bytes as the local engine, a killed worker changes
nothing, and without Ray installed the option is refused with exit code 2 and an install hint."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import random_checkpoint

from benchmarks.ray_head import RAY_ENV, command_line, descendants, local_head

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_RAY = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0


def hmcompress(*args: object, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", RAY_ENV)
    return subprocess.run([sys.executable, "-m", "hmcompress", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, **kwargs)


def test_without_ray_the_engine_is_refused_with_an_install_hint(tmp_path):
    """A `ray` package that cannot be imported stands for Ray being absent."""
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    source = random_checkpoint(tmp_path / "model.safetensors", 1, 64)
    env = {**RAY_ENV, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    run = hmcompress("compress", source, "--engine", "ray", "-q", env=env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "pip install 'hmcompress[ray]'" in run.stderr
    assert not list(tmp_path.glob("*.hm.*")) and not list(tmp_path.glob(".*hmwork"))


def test_address_without_the_ray_engine_is_a_usage_error(tmp_path):
    source = random_checkpoint(tmp_path / "model.safetensors", 1, 64)
    run = hmcompress("compress", source, "--address", "127.0.0.1:6379", "-q")
    assert run.returncode == 2 and "--address needs --engine ray" in run.stderr


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with 2 CPUs (two worker processes), ours alone."""
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install 'hmcompress[ray]')")
    with local_head(2) as running:
        yield running


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_bytes(head, tmp_path):
    """float32, bfloat16 and float16 matrices: the same file as two local workers write."""
    address, _pid = head
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    source = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(96, 96, generator=gen), "b.weight": torch.randn(80, 96, generator=gen),
               "c.weight": torch.randn(96, 64, generator=gen).bfloat16(),
               "d.weight": torch.randn(64, 64, generator=gen).half()}, str(source))
    local, ray = tmp_path / "local.hm.safetensors", tmp_path / "ray.hm.safetensors"
    assert hmcompress("compress", source, "-o", local, "--workers", 2, "-q").returncode == 0
    run = hmcompress("compress", source, "-o", ray, "--engine", "ray", "--address", address, "-q", "--json")
    assert run.returncode == 0, run.stderr
    assert ray.read_bytes() == local.read_bytes()


@pytest.mark.slow
def test_a_killed_ray_worker_changes_nothing(head, tmp_path):
    """SIGKILL the worker process running a task mid-run: Ray runs the task again and the file is
    byte-identical to the local engine's."""
    address, head_pid = head
    source = random_checkpoint(tmp_path / "model.safetensors", 6, 512)
    local, ray = tmp_path / "local.hm.safetensors", tmp_path / "ray.hm.safetensors"
    assert hmcompress("compress", source, "-o", local, "--workers", 1, "-q").returncode == 0
    run = subprocess.Popen([sys.executable, "-m", "hmcompress", "compress", str(source), "-o", str(ray),
                            "--engine", "ray", "--address", address, "-q"], cwd=ROOT, env=RAY_ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        busy = [p for p in descendants(head_pid) if command_line(p).startswith("ray::_task")]
        if busy:
            os.kill(busy[0], signal.SIGKILL)  # a worker of the head this test started
            killed = busy[0]
        time.sleep(0.05)
    _out, err = run.communicate(timeout=300)
    assert killed is not None, "no task was seen running"
    assert run.returncode == 0, err
    assert ray.read_bytes() == local.read_bytes()


@pytest.mark.slow
def test_an_interrupted_ray_run_resumes(head, tmp_path):
    """Ctrl-C on the driver mid-run keeps the finished matrices (exit 130); the same command with
    --resume finishes the file, byte-identical to the local engine's."""
    address, head_pid = head
    source = random_checkpoint(tmp_path / "model.safetensors", 6, 512)
    local, ray = tmp_path / "local.hm.safetensors", tmp_path / "ray.hm.safetensors"
    assert hmcompress("compress", source, "-o", local, "--workers", 1, "-q").returncode == 0
    command = [sys.executable, "-m", "hmcompress", "compress", str(source), "-o", str(ray), "--engine", "ray",
               "--address", address, "-q"]
    run = subprocess.Popen(command, cwd=ROOT, env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    work = tmp_path / f".{ray.name}.hmwork"
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if work.is_dir() and any(p.suffix == ".safetensors" and not p.name.startswith(".") for p in work.iterdir()):
            run.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "--resume" in err and not ray.exists()
    deadline = time.monotonic() + 30  # the cluster stops the interrupted driver's tasks
    while any(command_line(p).startswith("ray::_task") for p in descendants(head_pid)):
        assert time.monotonic() < deadline, "the interrupted run's tasks still run"
        time.sleep(0.1)
    again = hmcompress("compress", source, "-o", ray, "--engine", "ray", "--address", address, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stderr
    assert ray.read_bytes() == local.read_bytes()
    assert not any(command_line(p).startswith("ray::_task") for p in descendants(head_pid))
