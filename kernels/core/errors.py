"""Errors the engine raises on purpose. Front ends (command line, ComfyUI nodes) show their message as is."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the problem (command line: one line, exit code 2)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good state was kept."""

    def __init__(self, step: int, loss: float, checkpoint: str | None):
        where = f"; the last good state is in {checkpoint}" if checkpoint else ""
        super().__init__(f"loss became {loss} at step {step}: training stopped{where}")
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


class TrainingInterrupted(RuntimeError):
    """Training was cancelled (Ctrl-C, ComfyUI Cancel); a checkpoint was written if one was asked for."""

    def __init__(self, step: int, checkpoint: str | None):
        where = f"; resume from {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted after {step} steps{where}")
        self.step, self.checkpoint = step, checkpoint
