"""Unit tests of the shared training loop's pieces (fcmae/runtime): the bounded loss history, the stop-signal
handler, where a run starts (find_start's --resume/--overwrite rules) and the settings a resume must share."""
import os
import random
import signal

import pytest
import torch

from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.errors import CheckpointError, UsageError
from fcmae.runtime.history import HISTORY_POINTS, LossHistory
from fcmae.runtime.run_start import Start, StartRules, check_same_settings, find_start
from fcmae.runtime.signals import StopRequest

FIXED = ("model", "in_chans")
RUN_ONLY = frozenset({"output_dir", "max_steps"})
RULES = StartRules(format="fcmae-pretrain", what="an FCMAE pretraining checkpoint", fixed=FIXED, run_only=RUN_ONLY)
FORMAT = RULES.format


def start_of(folder, resume, overwrite):
    """find_start's (path, state)."""
    start = find_start(folder, resume, overwrite, RULES)
    return start.path, start.state


# --------------------------------------------------------------------------------------------------
# LossHistory


def test_loss_history_stays_bounded_and_exact():
    rng = random.Random(0)
    losses = [rng.uniform(0.1, 2.0) for _ in range(100_000)]
    history = LossHistory()
    for step, loss in enumerate(losses, 1):
        history.add(step, loss)
        assert len(history.curve) <= HISTORY_POINTS + 1
    summary = history.summary()
    assert summary["first_loss"] == losses[0] and summary["last_loss"] == losses[-1]
    assert summary["mean_last_10"] == pytest.approx(sum(losses[-10:]) / 10, rel=1e-12)
    assert history.recent == losses[-10:]
    # the curve: [last step, mean, count] points covering every step once, in order
    assert sum(p[2] for p in history.curve) == len(losses)
    assert history.curve[-1][0] == len(losses)
    assert all(a[0] < b[0] for a, b in zip(history.curve, history.curve[1:]))
    mean = sum(p[1] * p[2] for p in history.curve) / len(losses)
    assert mean == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    # each point's mean is the mean of exactly the steps it covers
    start = 0
    for last, point_mean, count in history.curve:
        assert last - start == count
        assert point_mean == pytest.approx(sum(losses[start:last]) / count, rel=1e-9)
        start = last
    assert history.take_window() == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    assert history.take_window() != history.take_window()  # NaN: nothing recorded since


def test_loss_history_round_trips_through_its_state():
    a = LossHistory()
    for step in range(1, 5001):
        a.add(step, 1.0 / step)
    b = LossHistory(a.state())
    for step in range(5001, 6001):
        a.add(step, 1.0 / step)
        b.add(step, 1.0 / step)
    assert a.state() == b.state()
    assert LossHistory().summary() == {}


def test_loss_history_short_runs_keep_every_step():
    history = LossHistory()
    for step in range(1, 11):
        history.add(step, float(step))
    assert history.curve == [[s, float(s), 1] for s in range(1, 11)]


# --------------------------------------------------------------------------------------------------
# StopRequest


def _handlers():
    return {s: signal.getsignal(s) for s in StopRequest.SIGNALS}


@pytest.mark.parametrize("sig", StopRequest.SIGNALS, ids=lambda s: s.name)
def test_stop_request_records_the_signal_and_restores_handlers(sig):
    def mine(signum, frame):
        raise AssertionError("the previous handler ran during the run")

    previous = signal.signal(sig, mine)
    try:
        before = _handlers()
        with StopRequest() as stop:
            assert stop.signal is None
            os.kill(os.getpid(), sig)
            assert stop.signal == sig.name
        assert _handlers() == before
    finally:
        signal.signal(sig, previous)


def test_stop_request_restores_handlers_after_an_exception():
    before = _handlers()
    with pytest.raises(ZeroDivisionError):
        with StopRequest():
            assert all(h != before[s] for s, h in _handlers().items())
            1 / 0
    assert _handlers() == before
    # and nested use (a run inside a run, e.g. tests) restores each level
    with StopRequest():
        inner_before = _handlers()
        with StopRequest():
            pass
        assert _handlers() == inner_before
    assert _handlers() == before


# --------------------------------------------------------------------------------------------------
# find_start


def state(step: int, fmt: str = FORMAT, value: float = 1.0, **drop):
    s = {"format": fmt, "model": {"w": torch.full((3,), value)}, "optimizer": {}, "scaler": {}, "step": step,
         "args": {"model": "convnextv2_atto"}, "rng": {}}
    for key in drop:
        s.pop(key)
    return s


def save(folder, step, **kw):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"checkpoint-{step:08d}.pth")
    torch.save(state(step, **kw), path)
    return path


def test_find_start_fresh_in_an_empty_or_missing_folder(tmp_path):
    for resume in ("auto", "none"):
        assert start_of(str(tmp_path / "missing"), resume, False) == (None, None)
        assert start_of(str(tmp_path), resume, False) == (None, None)
    assert not (tmp_path / "missing").exists()


def test_find_start_auto_takes_the_newest(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 12)
    save(tmp_path, 2)
    path, found = start_of(str(tmp_path), "auto", False)
    assert path == newest and found["step"] == 12


def test_find_start_overwrite_starts_fresh(tmp_path):
    save(tmp_path, 3)
    for resume in ("auto", "none"):
        assert start_of(str(tmp_path), resume, True) == (None, None)
    assert ckpt.list_checkpoints(str(tmp_path))  # deleted only when the run starts (clear_for_fresh_start)


def test_find_start_none_into_another_runs_folder_is_refused(tmp_path):
    save(tmp_path, 3)
    with pytest.raises(UsageError) as e:
        start_of(str(tmp_path), "none", False)
    message = str(e.value)
    assert "checkpoint-00000003.pth" in message and "--overwrite" in message and "--output-dir" in message
    assert "--resume auto" in message


def test_find_start_explicit_path(tmp_path):
    here = save(tmp_path / "run", 2)
    save(tmp_path / "run", 4)
    path, found = start_of(str(tmp_path / "run"), here, False)  # an older one of this run
    assert path == here and found["step"] == 2
    elsewhere = save(tmp_path / "other", 7)
    path, found = start_of(str(tmp_path / "new"), elsewhere, False)  # into an empty folder: fine
    assert path == elsewhere and found["step"] == 7
    with pytest.raises(UsageError, match="--overwrite"):  # into a folder of another run's checkpoints: not
        start_of(str(tmp_path / "run"), elsewhere, False)
    assert start_of(str(tmp_path / "run"), elsewhere, True)[0] == elsewhere


def test_find_start_checks_the_format(tmp_path):
    save(tmp_path / "ft", 1, fmt="fcmae-finetune")
    with pytest.raises(UsageError, match=r"is not an FCMAE pretraining checkpoint \(format 'fcmae-finetune'\)"):
        start_of(str(tmp_path / "ft"), "auto", False)
    save(tmp_path / "broken", 1, optimizer=True)
    with pytest.raises(UsageError, match="has no 'optimizer'"):
        start_of(str(tmp_path / "broken"), "auto", False)


def test_find_start_refuses_non_finite_weights_naming_a_finite_checkpoint(tmp_path):
    good = save(tmp_path, 1)
    save(tmp_path, 2, value=float("nan"))
    with pytest.raises(CheckpointError) as e:
        start_of(str(tmp_path), "auto", False)
    assert "checkpoint-00000002.pth holds non-finite weights" in str(e.value)
    assert f"--resume {good}" in str(e.value)
    (tmp_path / "checkpoint-00000001.pth").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint with finite weights"):
        start_of(str(tmp_path), "auto", False)


def test_find_start_sets_aside_an_unreadable_newest(tmp_path):
    good = save(tmp_path, 1)
    (tmp_path / "checkpoint-00000002.pth").write_bytes(b"\0" * 100)
    path, found = start_of(str(tmp_path), "auto", False)
    assert path == good and found["step"] == 1
    assert (tmp_path / "checkpoint-00000002.pth.unreadable").exists()
    assert ckpt.list_checkpoints(str(tmp_path)) == [good]


# --------------------------------------------------------------------------------------------------
# check_same_settings

def same_settings(saved, now):
    """check_same_settings' warning for a checkpoint 'ck.pth' saved with `saved`."""
    return check_same_settings(Start("ck.pth", {"args": saved}), now, RULES).warning


def test_same_settings_fixed_ones_must_match():
    saved = {"model": "convnextv2_atto", "in_chans": 3, "input_size": [64, 64], "batch_size": 4}
    with pytest.raises(UsageError) as e:
        same_settings(saved, dict(saved, in_chans=1, model="convnextv2_femto"))
    message = str(e.value)
    assert "ck.pth was trained with --model convnextv2_atto, --in-chans 3" in message
    assert "this run has convnextv2_femto, 1" in message


def test_same_settings_others_warn():
    """The warning is returned, to be logged once the run's log.txt is open."""
    saved = {"model": "convnextv2_atto", "in_chans": 3, "batch_size": 4, "mask_ratio": 0.6, "max_steps": 2}
    # run-only settings change freely
    assert same_settings(saved, dict(saved, max_steps=9, output_dir="x")) is None
    message = same_settings(saved, dict(saved, batch_size=8, mask_ratio=0.75))
    assert "batch_size 4 -> 8" in message and "mask_ratio 0.6 -> 0.75" in message
    # a setting the saved run did not record (an older checkpoint) is not an error for the fixed ones
    same_settings({"model": "convnextv2_atto"}, {"model": "convnextv2_atto", "in_chans": 3})


def test_an_option_added_since_the_checkpoint_changes_nothing_at_its_default():
    """An old checkpoint does not record an option added later (e.g. --augment-on-device): at its default it keeps
    the old behaviour and is not named; given another value, it is."""
    from fcmae.pretrain.options import START_RULES

    saved = {"model": "convnextv2_atto", "in_chans": 3, "batch_size": 4}
    now = dict(saved, augment_on_device=False)
    assert START_RULES.defaults["augment_on_device"] is False
    assert check_same_settings(Start("ck.pth", {"args": saved}), now, START_RULES).warning is None
    message = check_same_settings(Start("ck.pth", {"args": saved}), dict(now, augment_on_device=True),
                                  START_RULES).warning
    assert "augment_on_device None -> True" in message
    assert START_RULES.defaults["epochs"] == 800  # the stage's own set_defaults
