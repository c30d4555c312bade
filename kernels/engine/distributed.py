"""The processes of one training run, as the loop and the command line see them: one (the default), or N started by
``accelerate launch`` (data parallel; accelerate is imported only then, and only here).

Semantics (one rule, so N processes at batch b train exactly what one process trains at batch N·b): every process
draws the whole *global* batch of a micro-step from the seeded generators (cheap: indices, flips, noise, timesteps,
latents from the cache) and trains only its own disjoint, contiguous shard of it (:meth:`Processes.rows`). After
the micro-batches of an optimizer step, the gradients are averaged over the processes (one all-reduce through
accelerate), which is the gradient of the loss averaged over the global batch: every process then takes the same
optimizer step and the adapters stay equal without being sent around. Only the main process writes files; the
others wait for it (:meth:`Processes.on_main`) and hear when it failed instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from ..core.devices import default_device
from ..core.errors import UserInputError

T = TypeVar("T")

#: environment variables a launcher (torchrun / accelerate launch, mpirun) sets to the number of processes
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started (1 when run plainly); read from the environment, nothing imported."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.strip().isdigit() and int(value) > 0:
            return int(value)
    return 1


class Processes:
    """One process: every collective is the identity, so the loop's plain path is exactly what it was."""

    num: int = 1
    index: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def local_batch(self, batch: int) -> int:
        """Samples of a global ``batch`` each process trains; refuses a batch that does not split evenly."""
        if batch % self.num:
            raise UserInputError(
                f"the batch of {batch} cannot be split evenly over {self.num} processes: the batch size is the global "
                f"batch (all processes together), so give a multiple of {self.num} "
                f"(e.g. --batch-size {self.num * max(1, batch // self.num)}), each process then trains batch/{self.num}")
        return batch // self.num

    def rows(self, batch: int) -> slice:
        """This process's rows of a global batch of ``batch`` samples."""
        b = self.local_batch(batch)
        return slice(self.index * b, (self.index + 1) * b)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the processes (the same on every process)."""
        return value

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the processes (before clipping and the step)."""

    def same_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Give every process the main process's values of ``params``."""

    def wait(self) -> None:
        """Barrier: return when every process got here."""

    def agree(self, value, what: str) -> None:
        """Refuse to go on unless every process has the same ``value`` (picklable)."""

    def on_main(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on the main process only (writing files); the others wait for it and raise when it failed.
        Returns ``fn()``'s result on the main process, None elsewhere."""
        return fn()

    def together(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every process and wait for all; when it failed anywhere, every process raises."""
        return fn()


SINGLE = Processes()


class AcceleratedProcesses(Processes):
    """N processes started by ``accelerate launch`` (or torchrun / mpirun): accelerate's Accelerator sets up the
    process group (NCCL on GPUs, gloo on CPUs) and does every collective."""

    def __init__(self, cpu: bool):
        for name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
            if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true":
                raise UserInputError(f"accelerate is configured for {name}: adapters are small, so training uses "
                                     "plain data parallel; launch with `accelerate launch --multi_gpu` (or a config "
                                     "without DeepSpeed / FSDP / Megatron-LM)")
        try:
            from accelerate import Accelerator
            from accelerate.utils import GradientAccumulationPlugin
        except ImportError as e:  # pragma: no cover - accelerate is installed with diffusers' training extras
            raise UserInputError(f"this is one of {launched_processes()} launched processes, but accelerate cannot "
                                 f"be imported ({e}): pip install accelerate") from None
        # The loop keeps its own autocast (--dtype), accumulation (--grad-accum) and learning-rate schedule, whatever
        # accelerate's config says: accelerate runs the processes and their collectives.
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no",
                                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))
        state = self.accelerator.state
        self.num, self.index, self.device = state.num_processes, state.process_index, self.accelerator.device
        if self.num != launched_processes():
            raise UserInputError(
                f"the launcher started {launched_processes()} processes but accelerate set up {self.num} "
                f"(distributed type {state.distributed_type}); on a machine without GPUs give --device cpu")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.detach(), reduction="mean")

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """One all-reduce of all gradients (flattened, float32), with a presence flag per parameter so a parameter
        no process touched keeps ``grad=None`` (AdamW then leaves it alone, as in one process)."""
        params = list(params)
        if not params:
            return
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=parts[0].device)
        flat = self.accelerator.reduce(torch.cat(parts + [present]), reduction="mean")
        touched = (flat[-len(params):] > 0).tolist()
        offset = 0
        for k, p in enumerate(params):
            n = p.numel()
            if touched[k]:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n

    def same_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        from accelerate.utils import broadcast

        params = list(params)
        if not params:
            return
        flat = broadcast(torch.cat([p.detach().float().flatten() for p in params]), from_process=0)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def agree(self, value, what: str) -> None:
        from accelerate.utils import gather_object

        values = gather_object([value])
        if any(v != values[0] for v in values):
            raise UserInputError(f"the processes disagree on {what} ({', '.join(map(str, values))}): every process "
                                 "must see the same files (run them on one machine, or on a shared folder)")

    def _outcome(self, error: BaseException | None, what: str) -> None:
        from accelerate.utils import gather_object

        errors = gather_object([None if error is None else (type(error).__name__, str(error))])
        if error is not None:
            raise error
        failed = [(k, e) for k, e in enumerate(errors) if e is not None]
        if failed:
            k, (kind, message) = failed[0]
            raise (UserInputError if kind == UserInputError.__name__ else RuntimeError)(
                f"process {k} failed {what}: {message}")

    def on_main(self, fn: Callable[[], T], what: str) -> T | None:
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # told to the others below, then raised here
                error = e
        self._outcome(error, what)
        return result

    def together(self, fn: Callable[[], T], what: str) -> T:
        result, error = None, None
        try:
            result = fn()
        except Exception as e:
            error = e
        self._outcome(error, what)
        return result


_launched: Processes | None = None


def launched(device: str | None = None) -> Processes:
    """The processes this program runs in: :data:`SINGLE` unless a launcher started several (``accelerate launch
    --num_processes N``, torchrun, mpirun), then accelerate's (created once per process). ``device`` is the one
    asked for: under several processes each process takes its own (``cuda:<local rank>``), so only ``cpu`` (gloo
    on CPUs) or nothing may be asked for."""
    global _launched
    if launched_processes() <= 1:
        return SINGLE
    if device is not None and device != "cpu":
        raise UserInputError(f"--device {device}: under accelerate launch every process takes its own device "
                             "(cuda:<local rank>); leave out --device, or give --device cpu to run on CPUs")
    if _launched is None:
        _launched = AcceleratedProcesses(cpu=device == "cpu" or default_device() == "cpu")
    return _launched
