"""What is logged between two logging steps, accumulated on the device (no host sync until read)."""

from __future__ import annotations

import torch


class IntervalMeter:
    """Sums each loss term over the optimizer steps that were applied, counts the skipped (non-finite)
    steps, and per term the steps where it was non-finite. `read()` is the one host sync of a
    logging step.

    The non-finite flags come from train_step already reduced over ranks (a step is skipped on every
    rank or on none), so the counts are exact whole steps, the same on every rank. The loss sums are
    this rank's; read() averages them over ranks. Corrupt samples are counted per rank and summed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # One running vector per kind of add (the same term names, flags and kind of step): [each term's
        # value on applied steps..., each flag..., applied steps]. A few kernels per add, whatever the number
        # of terms; read() and state_dict() unpack them into the per-key sums below.
        self.groups: dict[tuple[tuple[str, ...], tuple[str, ...], bool], torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}  # per key (loss/<term>, count/<term>, nonfinite/<name>, ok_steps)
        self.steps = 0

    def add(self, terms: dict[str, torch.Tensor], nonfinite: dict[str, torch.Tensor], ok: torch.Tensor,
            training_step: bool = True) -> None:
        """terms: each loss term's mean over the step's micro-batches; nonfinite: per term (and
        "grad_norm") a 0/1 flag, the same on every rank; ok: no flag set (the update was applied).
        Each term is averaged over the applied steps that had it (the discriminator's terms exist only
        once it trains). training_step=False: a second optimizer's step within the same training step
        (the discriminator's), which does not count toward the skipped training steps."""
        okf = ok.float().reshape(1)
        values = torch.stack([v.detach() for v in terms.values()]).float()
        flags = torch.stack([f for f in nonfinite.values()]).float()
        packed = torch.cat([torch.where(torch.isfinite(values), values, 0.0) * okf, flags, okf])
        key = (tuple(terms), tuple(nonfinite), training_step)
        self.groups[key] = self.groups[key] + packed if key in self.groups else packed
        if training_step:
            self.steps += 1

    def _per_key(self) -> dict[str, torch.Tensor]:
        """The interval's sums per key (device tensors): what was loaded plus every group, unpacked."""
        sums = dict(self.sums)

        def acc(key: str, value: torch.Tensor) -> None:
            sums[key] = sums[key] + value if key in sums else value

        for (names, flag_names, training_step), packed in self.groups.items():
            okf = packed[-1]
            for i, name in enumerate(names):
                acc(f"loss/{name}", packed[i])
                acc(f"count/{name}", okf)
            for i, name in enumerate(flag_names):
                acc(f"nonfinite/{name}", packed[len(names) + i])
            if training_step:
                acc("ok_steps", okf)
        return sums

    def read(self, accelerator, skipped_samples: int = 0) -> tuple[dict[str, float], dict[str, int], int, int]:
        """(means of the terms over applied steps and over ranks, {term: steps it was non-finite},
        steps skipped, corrupt samples met by all ranks) for the interval; then starts a new interval."""
        per_key = self._per_key()
        names = sorted(per_key)
        device = next(iter(per_key.values())).device if per_key else accelerator.device
        local = torch.stack([per_key[k].float().reshape(()) for k in names]
                            + [torch.tensor(float(skipped_samples), device=device)])
        total = accelerator.reduce(local, "sum").tolist() if accelerator.num_processes > 1 else local.tolist()
        world = accelerator.num_processes
        raw = dict(zip(names, total[:-1]))
        good = raw.pop("ok_steps", 0.0) / world  # the same on every rank
        skipped = self.steps - round(good)
        counts = {k.split("/", 1)[1]: v / world for k, v in raw.items() if k.startswith("count/")}
        means = {k: v / world / counts.get(k[5:], good) for k, v in raw.items()
                 if k.startswith("loss/") and counts.get(k[5:], good) > 0}
        bad = {k.split("/", 1)[1]: round(v / world) for k, v in raw.items() if k.startswith("nonfinite/") and v > 0}
        self.reset()
        return means, bad, skipped, round(total[-1])

    def state_dict(self) -> dict:
        """The interval's partial sums as plain numbers (exact: float32 values are exact in JSON)."""
        return {"steps": self.steps, "sums": {k: float(v) for k, v in self._per_key().items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.reset()
        self.steps = int(state["steps"])
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state["sums"].items()}
