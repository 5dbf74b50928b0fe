"""Copies between host memory and a CUDA device, made on the engine's read-ahead and write threads.

The merge thread and its workers queue their kernels on the device's default stream. Inputs go up
on a stream of their own while the tensor before them merges, and outputs come down on another
while the next one merges, each ordered against the merge by an event, not by waiting on the host.
On the CPU every step is a no-op.
"""
from __future__ import annotations

import torch


class Transfers:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.up, self.down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def upload(self, inputs: list[torch.Tensor], base: torch.Tensor | None):
        """(inputs, base, event) with the tensors copied to the device on the upload stream, the
        event marking the copies done (read-ahead thread). A pageable copy returns once the host
        bytes are staged, so the caller may free (unmap) them at once."""
        if not self.cuda:
            return inputs, base, None
        with torch.cuda.stream(self.up):
            inputs = [x.to(self.device, non_blocking=True) for x in inputs]
            base = base.to(self.device, non_blocking=True) if base is not None else None
            done = torch.cuda.Event()
            done.record(self.up)
        return inputs, base, done

    def arrive(self, inputs: list[torch.Tensor], base: torch.Tensor | None,
               done: torch.cuda.Event | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The uploaded tensors, usable on the default stream: the merge's kernels wait for the
        copies, and the memory is not handed to a later upload until the merge's use of it is done."""
        if done is not None:
            merging = torch.cuda.default_stream(self.device)
            merging.wait_event(done)
            for x in inputs + ([base] if base is not None else []):
                x.record_stream(merging)
        return inputs, base

    def mark(self) -> torch.cuda.Event | None:
        """An event after every kernel queued so far on the default stream (an output's)."""
        if not self.cuda:
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.default_stream(self.device))
        return ready

    def download(self, out: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """out in host memory once `ready` (from mark) has passed (write thread). Blocks until the
        copy is done, so out's device memory may be reused when this returns."""
        if ready is None:
            return out
        with torch.cuda.stream(self.down):
            self.down.wait_event(ready)
            return out.to("cpu")
