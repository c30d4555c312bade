"""``kill -9`` while a checkpoint or an adapter file is being written leaves the previous file whole.

A forked child process rewrites a training checkpoint and an adapter file in a loop (each write a new version whose every
tensor and metadata entry carry the version number); it is killed at 20 random moments. After each kill both files
must load, be internally consistent (one version throughout) and not be older than the last write the child
reported; the temporary file a kill leaves is removed by the next write.
"""

import os
import random
import signal
import time

import pytest
import torch

from fewshot_personalize.kernels.core.atomic_write import stale_temporaries
from fewshot_personalize.kernels.formats.checkpoint import save_checkpoint
from fewshot_personalize.kernels.formats.safetensors_io import atomic_save, load_safetensors

KILLS = 20

def write_forever(folder, start: int, out: int) -> None:
    """The killed process: rewrite a checkpoint and an adapter file, version after version; report each round."""
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    w = torch.nn.Parameter(torch.zeros(512, 1024))  # 2 MiB parameter + 4 MiB of Adam moments per checkpoint
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.ones_like(w)
    opt.step()
    version = start
    while True:
        version += 1
        with torch.no_grad():
            w.fill_(version)
        save_checkpoint(folder / "run.safetensors", step=version, params={"w": w}, optimizer=opt, scheduler=None,
                        losses=[float(version)], fingerprint="kill-test")
        atomic_save({"lora.up": torch.full((2048, 512), float(version)), "lora.down": torch.full((512, 64), float(version))},
                    folder / "adapter.safetensors", {"version": str(version)}, overwrite=True)
        os.write(out, f"{version}\n".encode())


def check_whole(folder, at_least: int) -> int:
    """Both files load, each holds a single version throughout, not older than ``at_least``; returns the last
    whole round (the adapter's version: it is written after its checkpoint)."""
    ckpt, meta = load_safetensors(folder / "run.safetensors")
    version = int(meta["step"])
    assert torch.all(ckpt["param.w"] == version), "checkpoint tensors of different versions"
    assert meta["losses"] == f"[{float(version)}]"
    adapter, ameta = load_safetensors(folder / "adapter.safetensors")
    a_version = int(ameta["version"])
    assert torch.all(adapter["lora.up"] == a_version) and torch.all(adapter["lora.down"] == a_version)
    assert version >= at_least and a_version >= at_least
    assert a_version in (version, version - 1)  # the adapter is written right after its checkpoint
    return a_version


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")
def test_kill_9_during_writes_leaves_the_previous_file_whole(tmp_path):
    rng = random.Random(0)
    version, mid_write = 0, 0
    for _ in range(KILLS):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                os.close(read)
                write_forever(tmp_path, version, write)
            finally:
                os._exit(1)
        os.close(write)
        with os.fdopen(read) as lines:
            # the first child writes one whole round before it may be killed, so both files exist
            reported = int(lines.readline()) if version == 0 else version
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            reported = max([reported] + [int(v) for v in lines.read().split()])
        temps = stale_temporaries(tmp_path / "run.safetensors") + stale_temporaries(tmp_path / "adapter.safetensors")
        mid_write += bool(temps)
        version = check_whole(tmp_path, at_least=reported)
    # most kills land inside a write (the loop does nothing else), so the test did hit the window it guards
    print(f"{mid_write} of {KILLS} kills interrupted a write")
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills interrupted a write"
    # the next write of the same file sweeps what the killed writers left behind
    atomic_save({"x": torch.zeros(1)}, tmp_path / "run.safetensors", overwrite=True)
    atomic_save({"x": torch.zeros(1)}, tmp_path / "adapter.safetensors", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "run.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.safetensors"
    atomic_save({"x": torch.ones(3)}, path)

    class Boom(Exception):
        pass

    bad = {"x": torch.ones(3)}
    import fewshot_personalize.kernels.formats.safetensors_io as io

    real = io.save_file

    def fail_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise Boom()

    io.save_file = fail_half_way
    try:
        with pytest.raises(Boom):
            atomic_save(bad, path, overwrite=True)
    finally:
        io.save_file = real
    assert torch.equal(load_safetensors(path)[0]["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # ordinary permissions, not a temp file's 0600


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
