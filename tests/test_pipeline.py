"""Whole-checkpoint compression: worker processes, resume after a kill, bounded memory."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import compress_result
from safetensors.torch import save_file

from hmcompress.core.build import CompressionOptions
from hmcompress.io import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """Four matrices of different shapes (one large enough for LAPACK to use several threads)
    and a passthrough vector."""
    gen = torch.Generator().manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    tensors = {f"layer{i}.weight": torch.randn(160 + 16 * i, 192, generator=gen) for i in range(4)}
    tensors["layer3.weight"] = torch.randn(384, 384, generator=gen)
    tensors["layer0.bias"] = torch.randn(160, generator=gen)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def reference(cli, checkpoint, tmp_path_factory) -> bytes:
    """In this process, with several intra-op threads (workers use one: the bytes must not care)."""
    out = tmp_path_factory.mktemp("reference") / "model.hm.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        run = cli("compress", checkpoint, "-o", out, "--quiet", "--workers", "1")
    finally:
        torch.set_num_threads(threads)
    assert run.code == 0, run.stderr
    return out.read_bytes()


def workdir(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.hmwork"


@pytest.mark.slow
@pytest.mark.workers
def test_workers_write_the_same_bytes(cli, checkpoint, reference, tmp_path):
    out = tmp_path / "model.hm.safetensors"
    run = cli("compress", checkpoint, "-o", out, "--workers", "2", "--json")
    assert run.code == 0, run.stderr
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmruntime.py", out.name]
    assert compress_result(run.stdout)["totals"]["compressed"] == 4


def kill_at(command: list[str], marker: str) -> None:
    """Run ``command``; SIGKILL it once a line of its stderr starts with ``marker``."""
    # A real process: it is sent SIGKILL.
    proc = subprocess.Popen(command, text=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in proc.stderr:
            if line.startswith(marker):
                break
        else:
            pytest.fail(f"{command} ended before printing {marker!r}")
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.workers
@pytest.mark.parametrize("workers", ["1", "2"])
def test_resume_after_a_kill_reuses_results_and_writes_the_same_bytes(cli, checkpoint, reference, tmp_path, workers):
    out = tmp_path / "model.hm.safetensors"
    kill_at([sys.executable, "-m", "hmcompress", "compress", str(checkpoint), "-o", str(out), "--workers", "1"],
            "[2/4 ")  # two matrices done
    assert not out.exists()
    assert len(list(workdir(out).glob("*.safetensors"))) == 2
    run = cli("compress", checkpoint, "-o", out, "--resume", "--workers", workers)
    assert run.code == 0, run.stderr
    assert "resumed 2 of 4 matrices" in run.stderr
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmruntime.py", out.name]


@pytest.mark.slow
def test_resume_recomputes_what_changed_and_a_fresh_run_ignores_old_results(cli, checkpoint, tmp_path):
    source = tmp_path / "model.safetensors"
    source.write_bytes(checkpoint.read_bytes())
    out = tmp_path / "model.hm.safetensors"
    kill_at([sys.executable, "-m", "hmcompress", "compress", str(source), "-o", str(out), "--workers", "1"],
            "[2/4 ")  # two matrices done
    from safetensors.torch import load_file
    tensors = load_file(str(source))
    tensors["layer0.weight"] = tensors["layer0.weight"] * 2  # the source changed meanwhile
    save_file(tensors, str(source))
    run = cli("compress", source, "-o", out, "--resume", "--workers", "1")
    assert run.code == 0, run.stderr
    assert "resumed 1 of 4 matrices" in run.stderr
    fresh = tmp_path / "fresh" / "model.hm.safetensors"
    fresh.parent.mkdir()
    assert cli("compress", source, "-o", fresh, "--quiet", "--workers", "1").code == 0
    assert out.read_bytes() == fresh.read_bytes()
    assert cli("verify", out, "--original", source).code == 0


def test_damaged_results_are_recomputed(cli, checkpoint, tmp_path):
    out = tmp_path / "model.hm.safetensors"
    work = pipeline.WorkDir.beside(out)
    work.prepare(resume=False)
    work.result(0).write_bytes(b"not a result")
    run = cli("compress", checkpoint, "-o", out, "--resume", "--workers", "1")
    assert run.code == 0, run.stderr
    assert "resumed 0 of 4 matrices" in run.stderr


def test_result_key_depends_on_contents_and_options():
    w = torch.ones(3, 4)
    base = pipeline.result_key(w, CompressionOptions())
    assert base == pipeline.result_key(w.clone(), CompressionOptions())
    assert base != pipeline.result_key(w * 2, CompressionOptions())
    assert base != pipeline.result_key(w.double(), CompressionOptions())
    assert base != pipeline.result_key(w.reshape(4, 3), CompressionOptions())
    assert base != pipeline.result_key(w, CompressionOptions(tol=1e-3))


PEAK_RSS = r"""
import resource, sys
from hmcompress.cli import main
sys.argv = ["hmcompress", *sys.argv[1:]]
try:
    main()
finally:
    print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
"""


def peak_rss(*args: object) -> int:
    # A real process: its own peak resident memory is the measurement.
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.split("peak")[-1])


@pytest.mark.slow
def test_peak_memory_follows_the_largest_tensor_not_the_file(tmp_path):
    """A 192 MB checkpoint (24 tensors of 8 MB, two of them compressed) is read and written one
    tensor at a time: the peak grows by far less than the file."""
    gen = torch.Generator().manual_seed(0)
    small = tmp_path / "small.safetensors"
    save_file({"w": torch.randn(128, 128, generator=gen)}, str(small))
    big = tmp_path / "big.safetensors"
    tensors = {f"w{i}": torch.randn(128, 128, generator=gen) for i in range(2)}
    tensors.update({f"buffer{i:02d}": torch.full((2 * 1024 * 1024,), float(i)) for i in range(24)})
    save_file(tensors, str(big))
    del tensors
    size = big.stat().st_size
    assert size > 190e6
    base = peak_rss("compress", small, "-o", tmp_path / "small.hm.safetensors", "--quiet", "--workers", "1")
    peak = peak_rss("compress", big, "-o", tmp_path / "big.hm.safetensors", "--quiet", "--workers", "1")
    assert peak - base < 0.25 * size, (peak - base, size)


@pytest.mark.slow
@pytest.mark.workers
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_says_how_to_resume_and_resume_finishes(cli, checkpoint, reference, tmp_path, workers):
    out = tmp_path / "model.hm.safetensors"
    # A real process: it is sent SIGINT (Ctrl-C).
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", "compress", str(checkpoint), "-o", str(out),
                             "--workers", workers], text=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    for line in proc.stderr:
        if line.startswith("[1/4 "):  # one matrix done, three to go
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted: nothing written" in rest and "--resume" in rest and "Traceback" not in rest
    assert not out.exists()
    run = cli("compress", checkpoint, "-o", out, "--resume", "--workers", workers)
    assert run.code == 0, run.stderr
    assert out.read_bytes() == reference


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    found: set[int] = set()
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found |= {child, *descendants(child)}
    return found


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.workers
@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_do_not_outlive_a_killed_parent(checkpoint, tmp_path):
    out = tmp_path / "model.hm.safetensors"
    # A real process: it is sent SIGKILL, and its worker processes must end with it.
    proc = subprocess.Popen([sys.executable, "-m", "hmcompress", "compress", str(checkpoint), "-o", str(out),
                             "--workers", "2"], text=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for line in proc.stderr:
            if line.startswith("[1/4 "):  # one matrix done: the workers run the rest
                break
        workers = descendants(proc.pid)
        assert workers
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
