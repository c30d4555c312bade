"""Data-parallel training under ``accelerate launch`` (engine/distributed.py): N processes at batch b train what one
process trains at batch N·b, only the main process writes, and a checkpoint written by N processes resumes under N.

Tolerance of two processes vs one at the doubled batch: both draw exactly the same samples, noise and timesteps (the
shard test checks that the shards' loss and gradient average to the whole batch's); what differs is float32
rounding: the denoiser runs 1+1 samples per forward instead of 2+2 (other kernel blockings), and the batch-mean
gradient is (g0 + g1)/2 from the all-reduce instead of the backward pass's own sum: ~1e-7 relative per step.
AdamW passes that on unchanged where a gradient is well above rounding noise (its update lr·m/(√v+ε) hardly moves),
but where a gradient is itself at noise level (here a few text-encoder q_proj LoRA entries) rounding sets its
direction, and that element may differ by up to one update, lr, per step. Measured after 4 steps at lr 1e-3
(6016 weights, up weights reach 4e-3), on this CPU with 1 and 2 threads: ||Δ||/||w|| = 1.1e-6 / 1.6e-6, median |Δ|
9e-10, 99th percentile 9e-8, 6 elements above 1e-6, max |Δ| 1.0e-5 / 1.5e-5. So: relative distance ≤ ``REL_TOL`` =
1e-4 (60× the measured), and every element within ``lr`` (no element more than one step's update apart; the
measured max is 1.5% of it). A missing all-reduce
(a process training its shard alone) is 2.5e-2 relative, max |Δ| 7.5e-3, 82% of the elements off by more than 1e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from fewshot_personalize.kernels.core.errors import UserInputError
from fewshot_personalize.kernels.engine.distributed import SINGLE, Processes, launched

REL_TOL = 1e-4
LR = 1e-3


@pytest.fixture(autouse=True)
def _threads():
    """Honour OMP_NUM_THREADS (conftest asks for 2 threads; on a busy 2-core machine one is several times faster)."""
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    yield
    torch.set_num_threads(before)


class Shard(Processes):
    """One process's view of an N-process run, without the others (the collectives are the identity): what it
    draws and trains."""

    def __init__(self, index: int, num: int = 2):
        self.index, self.num = index, num


def test_one_process_imports_no_accelerate_and_runs_the_plain_path():
    code = ("import sys; from fewshot_personalize.kernels.engine import loop, distributed;"
            "assert distributed.launched() is distributed.SINGLE;"
            "print('accelerate' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert SINGLE.rows(3) == slice(0, 3) and SINGLE.local_batch(3) == 3 and launched("cuda") is SINGLE


def test_the_global_batch_must_split_evenly_over_the_processes():
    assert [Shard(k, 3).rows(6) for k in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(UserInputError, match="batch of 3 cannot be split evenly over 2 processes.*--batch-size 2"):
        Shard(1).local_batch(3)


def test_launched_processes_take_their_own_device(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="every process takes its own device"):
        launched("cuda:1")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    from fewshot_personalize.kernels.backends.diffusers import load_pipeline

    return load_pipeline(tiny_sd)


def _trainer(pipe, processes, **kw):
    from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder
    from fewshot_personalize.kernels.engine.config import TrainConfig
    from fewshot_personalize.kernels.engine.data import TrainData
    from fewshot_personalize.kernels.engine.loop import Trainer
    from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 1, 32, 32)
    masks[..., 6:26, 8:24] = 1
    data = TrainData(torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, masks)
    cfg = TrainConfig(instance_prompts=("a sks toy", "a photo of sks toy"), class_prompt="a toy", steps=2,
                      resolution=32, lr=1e-3, batch_size=2, dtype="fp32", **kw)
    return Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), DreamBoothLora(LoraSettings(rank=2, train_text_encoder=True)),
                   data, cfg, processes=processes)


def _loss_and_grads(trainer):
    loss, _ = trainer._micro_batch_loss(1, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.params.items() if p.grad is not None}
    trainer.close()
    return loss.detach(), grads


@pytest.mark.parametrize("case", ["flip-masks-prior", "augment-fresh-views", "augment-pool"])
def test_shards_of_a_global_batch_give_its_loss_and_gradient(tiny_pipe, case):
    """Each process trains a disjoint shard of the same global batch: the shards' mean loss and gradient are the
    whole batch's (what the all-reduce then makes of them)."""
    from fewshot_personalize.kernels.augment import AugmentSettings, preset

    kw = {"flip-masks-prior": dict(random_flip=0.5, snr_gamma=5.0, noise_offset=0.05, background_loss_weight=0.3),
          "augment-fresh-views": dict(augment=AugmentSettings(**{**preset("strong").__dict__, "views": 0})),
          "augment-pool": dict(augment=AugmentSettings(**{**preset("strong").__dict__, "views": 2}))}[case]
    whole, whole_grads = _loss_and_grads(_trainer(tiny_pipe, SINGLE, **kw))
    parts = [_loss_and_grads(_trainer(tiny_pipe, Shard(k), **kw)) for k in range(2)]  # same model, method detached
    assert torch.allclose((parts[0][0] + parts[1][0]) / 2, whole, rtol=1e-5, atol=0)
    assert not torch.allclose(parts[0][0], parts[1][0])  # the shards differ: disjoint samples
    assert whole_grads and set(parts[0][1]) == set(whole_grads)
    for n, g in whole_grads.items():
        torch.testing.assert_close((parts[0][1][n] + parts[1][1][n]) / 2, g, rtol=1e-4, atol=1e-7, msg=n)


# --------------------------------------------------------------------------- real processes: accelerate launch
DRIVER = textwrap.dedent("""
    # Runs inside each process of `accelerate launch`: several command lines in a row, one of them stopped at a step.
    import json, sys
    from fewshot_personalize.kernels.cli import main
    from fewshot_personalize.kernels.engine import loop
    from fewshot_personalize.kernels.engine.distributed import launched

    spec = json.load(open(sys.argv[1]))
    procs = launched("cpu")
    real = loop.Trainer.train
    codes = []
    for run in spec["runs"]:
        stop = run.get("stop_at")
        if stop:
            def train(self, *, on_step=None, **kw):
                def hook(step, total, loss):
                    on_step(step, total, loss)
                    if step == stop:
                        raise KeyboardInterrupt
                return real(self, on_step=hook, **kw)
            loop.Trainer.train = train
        codes.append(main(run["argv"]))
        loop.Trainer.train = real
        procs.wait()
    json.dump({"codes": codes, "num": procs.num}, open(spec["result"] + f".{procs.index}", "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_processes_match_one_at_the_doubled_batch_and_resume(tiny_sd, image_folder, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="accelerate is not installed: multi-process training needs it")
    from fewshot_personalize.kernels.cli import main

    common = ["train", "--base", tiny_sd, "--images", str(image_folder), "--prompt", "a sks toy",
              "--class-prompt", "a toy", "--class-images", str(tmp_path / "class"), "--num-class-images", "3",
              "--steps", "4", "--rank", "2", "--train-text-encoder", "--lr", str(LR), "--flip", "0.5",
              "--resolution", "32", "--dtype", "fp32", "--device", "cpu", "--seed", "3"]
    two, resumed = tmp_path / "two.safetensors", tmp_path / "resumed.safetensors"
    spec = {"result": str(tmp_path / "result"), "runs": [
        {"argv": common + ["--batch-size", "3", "--out", str(tmp_path / "odd.safetensors")]},  # refused: 3 / 2
        {"argv": common + ["--batch-size", "2", "--out", str(two)]},
        {"argv": common + ["--batch-size", "2", "--checkpoint-every", "2", "--out", str(resumed)], "stop_at": 2},
        {"argv": common + ["--batch-size", "2", "--checkpoint-every", "2", "--out", str(resumed), "--resume"]},
    ]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSHOT_CACHE": str(tmp_path / "cache")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    # accelerate's own launcher; with --multi_gpu it starts the processes through torchrun, and on a machine without
    # GPUs (--device cpu) accelerate joins them with gloo (its --cpu mode needs mpirun to start more than one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path / "spec.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads((tmp_path / f"result.{k}").read_text()) for k in range(2)]
    assert [x["num"] for x in results] == [2, 2]
    assert [x["codes"] for x in results] == [[2, 0, 130, 0]] * 2
    assert "batch of 3 cannot be split evenly over 2 processes" in r.stderr
    assert r.stdout.count("trained 4 steps") == 2  # the main process speaks, once per finished run
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [f"class_{i:04d}_000.png" for i in range(3)]
    assert not (tmp_path / "odd.safetensors").exists()
    assert not (tmp_path / "resumed.checkpoint.safetensors").exists()

    # a checkpoint written by two processes resumes under two to the uninterrupted run's result, bit for bit
    a, b = _weights(two), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # one process at the doubled batch (class images reused from the folder the two processes made)
    single = tmp_path / "single.safetensors"
    assert main(common + ["--batch-size", "2", "--out", str(single)]) == 0, capsys.readouterr().err
    c = _weights(single)
    assert c.keys() == a.keys()
    delta = torch.cat([(a[k].float() - c[k].float()).flatten() for k in a])
    norm = torch.cat([c[k].float().flatten() for k in c]).norm()
    moved = max(c[k].float().abs().max().item() for k in c if k.endswith("lora_up.weight"))  # up weights start at 0
    print(f"two processes vs one: ||d||/||w|| = {delta.norm() / norm:.3g}, max |d| = {delta.abs().max():.3g}, "
          f"largest up weight {moved:.3g}")
    assert delta.norm() <= REL_TOL * norm, delta.norm() / norm
    assert delta.abs().max() <= LR, delta.abs().max()
    assert moved > 2 * LR  # four steps moved the weights well beyond the tolerance
