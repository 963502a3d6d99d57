"""Where metrics go: out_dir/metrics.jsonl always, TensorBoard / W&B when asked (and installed), and the
progress display (a tqdm bar on a terminal, otherwise one line per log step with ETA and tok/s).

    reporters = make_reporters(["tensorboard"], out_dir, run_config)      # ValueError if not installed
    progress = Progress(total_steps, start, mode="auto")
    progress.update(step, record)      # record: {"step", "loss", "lr", "tok_per_s", ...}
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

from elleci.train import format_value

REPORTERS = ("tensorboard", "wandb")
PROGRESS = ("auto", "bar", "lines", "none")
TIMING_KEYS = ("tok_per_s", "elapsed_s", "eta_s")       # differ between two runs of the same computation
NOT_SHOWN = {"rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"}  # TRL aliases


def check_reporters(names) -> None:
    """Refuse an unknown reporter or one whose package is missing, before anything runs."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"report_to: unknown reporter {name!r}; choose from {REPORTERS} (jsonl is always on)")
        package = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"report_to includes {name!r} but the {package!r} package is not installed "
                             f"(pip install {package}), or remove it from [log] report_to")


class JsonlReporter:
    def __init__(self, path):
        self.path = Path(path)

    def log(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardReporter:
    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict) -> None:
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, out_dir, run_config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(dir=str(out_dir), config=run_config, name=Path(out_dir).name, resume="allow")

    def log(self, record: dict) -> None:
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def make_reporters(names, out_dir, run_config: dict) -> list:
    check_reporters(names)
    out = [JsonlReporter(Path(out_dir) / "metrics.jsonl")]
    for name in names:
        out.append(TensorBoardReporter(Path(out_dir) / "tensorboard") if name == "tensorboard"
                   else WandbReporter(out_dir, run_config))
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_record(record: dict, total: int | None = None) -> str:
    """"step 12/100 | loss 0.6931 | lr 3.00e-04 | 310 tok/s | ETA 1m20s"."""
    step = record["step"]
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for k, v in record.items():
        if k in ("step", "elapsed_s", "eta_s") or k in NOT_SHOWN:
            continue
        parts.append(f"{v:.0f} tok/s" if k == "tok_per_s" else f"{k} {format_value(k, v)}")
    if "eta_s" in record:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def _tqdm_available() -> bool:
    return importlib.util.find_spec("tqdm") is not None


class Progress:
    """A tqdm bar (mode "bar", or "auto" on a terminal with tqdm installed) or printed lines ("lines")."""

    def __init__(self, total: int, start: int, mode: str = "auto", print_fn=print, stream=None):
        if mode not in PROGRESS:
            raise ValueError(f"progress={mode!r}; choose one of {PROGRESS}")
        stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if _tqdm_available() and stream.isatty() else "lines"
        if mode == "bar" and not _tqdm_available():
            mode = "lines"
        self.mode, self.total, self.print_fn = mode, total, print_fn
        self.start_step, self.t0 = start, time.perf_counter()
        self.bar, self.postfix = None, {}
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=stream)

    def eta(self, done_steps: int) -> float:
        """Seconds left, from the mean time of the steps run in this process."""
        ran = done_steps - self.start_step
        if ran <= 0:
            return math.inf
        return (time.perf_counter() - self.t0) / ran * (self.total - done_steps)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: dict) -> None:
        if self.bar is not None:                   # the main metrics, eval's kept beside the last step's
            self.postfix.update({k: format_value(k, v) for k, v in record.items() if k not in NOT_SHOWN and
                                 (k in ("loss", "lr", "tok_per_s", "eval_loss") or "accuracy" in k)})
            self.bar.set_postfix(self.postfix, refresh=False)
        elif self.mode == "lines":
            self.print_fn(format_record(record, self.total))

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode != "none":
            self.print_fn(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
