"""The run's metrics log: `WORKDIR/metrics.jsonl` (strict JSON, one record per logged step) and
TensorBoard events, resumable (`MetricsLog`); used by `genjax.train.trainer`."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from genjax.errors import UserError
from genjax.io import fs


def json_record(record: Mapping[str, Any]) -> str:
    """One metrics.jsonl line: strict JSON. A NaN / Inf value (bare `NaN` is not JSON) is written
    as null and its key listed under "nonfinite", e.g. `{"step": 3, "loss": null, "nonfinite": ["loss"]}`."""
    bad = [k for k, v in record.items() if isinstance(v, (float, np.floating)) and not np.isfinite(v)]
    if bad:
        record = {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False)


class MetricsLog:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step, strict JSON: see `json_record`)
    and TensorBoard events in `WORKDIR/tb/`; on resume from step s, records after s (left by a
    killed run) are dropped so the file reads as one uninterrupted run (the kept records are
    rewritten atomically). Writes only on process 0.

    Raises:
      UserError: metrics.jsonl cannot be written (a full or read-only disk), naming it.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:  # a last line cut off by a kill
                        pass
        fs.write_text(self.path, "".join(kept), "metrics")
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        try:
            self.file.write(json_record(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"metrics={self.path!r}: cannot write: {fs.describe_os_error(e)}") from e
        for key, value in record.items():
            if key not in ("step", "nonfinite") and value is not None:
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.tb.close()
