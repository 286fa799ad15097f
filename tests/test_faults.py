"""Faults a long job meets: SIGKILL, SIGTERM / SIGINT, corrupt checkpoints, a full disk.

The signal tests run ``fairness debias`` in child processes and signal them; the others use
the library in process. Tiny world, no validation prompts, a few 2-step iterations.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fairness.cli import main
from fairness.training.loop import Trainer, TrainingInterrupted
from fairness.training.rundir import CheckpointError, RunDir
from tests.helpers import PROMPTS, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def fast_config(root: Path, **over):
    """Tiny config without validation (checkpoints are cheap), 2 images of 2 sampler steps."""
    over = {"prompts": {"train": [{"prompts": PROMPTS[:2]}]}, "dft__steps": 2, "dft__eval_steps": 2,
            "train__images_per_prompt": 2, "train__ema_decay": 0.9, **over}
    return tiny_config(root, **over)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world")


def _cli_child(argv: list[str], log: str) -> None:
    out = open(log, "w", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001 - report it in the log, exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    out.flush()
    os._exit(code)


def _debias(config: Path, run: Path, log: Path):
    """``fairness debias`` in its own process. Forked from this one and entered at the console
    command's function (:func:`fairness.cli.main`): a fresh interpreter spends ~20 s importing
    torch and diffusers on a busy 2-core machine, which the signals under test do not need."""
    argv = ["debias", "--config", str(config), "--run-dir", str(run), "--quiet"]
    proc = multiprocessing.get_context("fork").Process(target=_cli_child, args=(argv, str(log)))
    proc.start()
    return proc


def _signal_after_first_checkpoint(procs: dict[Path, tuple], timeout: float = 180) -> None:
    """Send each ``run: (process, signal, log)`` its signal as soon as its first checkpoint is
    complete (renamed into place)."""
    pending, deadline = dict(procs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for run, (proc, signum, log) in list(pending.items()):
            if any(not p.name.endswith(".tmp") for p in (run / "checkpoints").glob("step_*")):
                os.kill(proc.pid, signum)
                del pending[run]
            elif not proc.is_alive():
                pytest.fail(f"the run ended (rc {proc.exitcode}) before a checkpoint:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    for proc, _, _ in pending.values():
        proc.kill()
    assert not pending, "no checkpoint in time"


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "log.jsonl").read_text().splitlines()]


def _checkpoint_names(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").glob("step_*")} if (run / "checkpoints").exists() else set()


def test_sigkill_and_sigterm_mid_run_then_resume_end_equal_to_the_uninterrupted_run(world, tmp_path):
    """Two ``fairness debias`` processes, one SIGKILLed and one SIGTERMed just after their
    first checkpoint; each is rerun on its run directory (``fairness.cli.main``, in process)
    and must end with the uninterrupted run's adapter, bit for bit, and its log."""
    cfg = fast_config(world, train__iterations=8, train__checkpoint_every=2)
    config = tmp_path / "job.yaml"
    config.write_text(cfg.to_yaml())
    killed, termed = tmp_path / "killed", tmp_path / "termed"
    logs = {run: tmp_path / f"{run.name}.log" for run in (killed, termed)}
    procs = {run: _debias(config, run, logs[run]) for run in (killed, termed)}
    _signal_after_first_checkpoint({killed: (procs[killed], signal.SIGKILL, logs[killed]),
                                    termed: (procs[termed], signal.SIGTERM, logs[termed])})
    Trainer(cfg, tmp_path / "full", progress=False).fit()  # the uninterrupted reference

    # SIGKILL: no handler runs, nothing is flushed.
    procs[killed].join(60)
    assert procs[killed].exitcode == -signal.SIGKILL
    assert not (killed / "adapter").exists()  # it died mid-run

    # SIGTERM: the current iteration ends, is checkpointed, and the command exits 143.
    procs[termed].join(120)
    assert procs[termed].exitcode == 128 + signal.SIGTERM
    text = logs[termed].read_text()
    assert "interrupted by SIGTERM after step" in text and "rerun the same command" in text
    step = int(text.split("interrupted by SIGTERM after step ")[1].split(";")[0])
    assert _rows(termed)[-1]["step"] == step < 8  # the last finished iteration ...
    assert RunDir(termed).latest_checkpoint().name == f"step_{step:06d}"  # ... is checkpointed
    assert not (termed / "adapter").exists()

    reference = load_file(str(tmp_path / "full" / "adapter" / "pytorch_lora_weights.safetensors"))
    for run in (killed, termed):
        assert main(["debias", "--config", str(config), "--run-dir", str(run), "--quiet"]) == 0
        resumed = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
        assert resumed.keys() == reference.keys() and reference
        for k in reference:
            torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=0)
        assert _rows(run) == _rows(tmp_path / "full") and [r["step"] for r in _rows(run)] == list(range(1, 9))


def test_sigint_checkpoints_the_current_iteration_and_exits_130(world, tmp_path):
    cfg = fast_config(world, train__iterations=6, train__checkpoint_every=4)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    loss_for = trainer.loss_for

    def interrupted_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration; the iteration still ends
        return loss_for(step)

    trainer.loss_for = interrupted_at_3
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGINT after step 3") as info:
        trainer.fit()
    assert info.value.exit_code == 130 and info.value.step == 3
    assert info.value.checkpoint == RunDir(tmp_path / "run").latest_checkpoint() == RunDir(tmp_path / "run").checkpoint_dir(3)
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3]


def _two_checkpoints(world: Path, run: Path) -> Trainer:
    cfg = fast_config(world, train__iterations=4, train__checkpoint_every=2)
    Trainer(cfg, run, progress=False).fit()
    return Trainer(cfg, run, progress=False)


def test_a_truncated_latest_checkpoint_is_skipped_with_a_warning_naming_it(world, tmp_path):
    cfg = fast_config(world, train__iterations=4, train__checkpoint_every=2)
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).fit()
    state = run / "checkpoints" / "step_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    trainer = Trainer(cfg, run, progress=False)
    with pytest.warns(RuntimeWarning, match=r"skipping checkpoint .*step_000004: state.pt has 1000 bytes.*truncated"):
        assert trainer.resume()
    assert trainer.step == 2 and [r["step"] for r in _rows(run)] == [1, 2]  # the log follows the checkpoint


def test_a_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(2, {"w": torch.ones(100)})
    run.save_checkpoint(4, {"w": torch.ones(100)})
    state = run.checkpoint_dir(4) / "state.pt"
    data = bytearray(state.read_bytes())
    data[-200] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="step_000004: state.pt does not match the SHA-256"):
        assert run.latest_checkpoint() == run.checkpoint_dir(2)


def test_a_checkpoint_without_a_manifest_that_cannot_be_read_is_skipped(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(2, {"step": 2})
    run.save_checkpoint(4, {"step": 4})
    (run.checkpoint_dir(4) / "manifest.json").unlink()  # as written before manifests existed
    (run.checkpoint_dir(4) / "state.pt").write_bytes(b"not a pickle")
    with pytest.warns(RuntimeWarning, match="step_000004: cannot be read"):
        path, state = next(run.usable_checkpoints())
    assert path.name == "step_000002" and state == {"step": 2}


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(2, {"step": 2, "w": torch.ones(1000)})

    def disk_full(obj, path):  # half a file, then ENOSPC, as a full disk does
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        run.save_checkpoint(4, {"step": 4, "w": torch.zeros(1000)})
    message = str(info.value)
    assert "step 4" in message and "No space left on device" in message
    assert "previous checkpoint" in message and "step_000002 is intact" in message
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000002"]  # no partial folder left
    monkeypatch.undo()
    assert run.latest_checkpoint() == run.checkpoint_dir(2)
    assert RunDir.load_checkpoint(run.checkpoint_dir(2))["w"].sum() == 1000


def test_a_log_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log_path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss/to')
    with pytest.warns(RuntimeWarning, match="dropping a last row cut short"):
        run.truncate_logs(2)
    assert run.read_rows(run.log_path) == [{"step": 1}, {"step": 2}]
