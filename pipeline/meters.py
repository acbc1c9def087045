"""Loss-term averages between logging steps, accumulated on the device (no host sync until read)."""

from __future__ import annotations

import torch


class IntervalMeter:
    """Sums each term over the optimizer steps whose update was applied, and counts, per term, the steps
    where it was non-finite. `read()` is the one host sync of a logging step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, terms: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        okf = ok.float()
        for name, value in terms.items():
            value = value.detach().float()
            finite = torch.isfinite(value)
            self._acc(f"loss/{name}", torch.where(finite, value, 0.0) * okf)
            self._acc(f"nonfinite/{name}", (~finite).float())
        self._acc("ok_steps", okf)
        self.steps += 1

    def _acc(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def read(self, accelerator) -> tuple[dict[str, float], dict[str, float]]:
        """(means of the terms over good steps, averaged over ranks; non-finite step counts per term)."""
        names = sorted(self.sums)
        values = accelerator.reduce(torch.stack([self.sums[k] for k in names]), "mean").tolist()
        raw = dict(zip(names, values))
        good = max(raw.pop("ok_steps", 0.0), 1e-9)
        means = {k: v / good for k, v in raw.items() if k.startswith("loss/")}
        bad = {k.split("/", 1)[1]: v for k, v in raw.items() if k.startswith("nonfinite/") and v > 0}
        self.reset()
        return means, bad
