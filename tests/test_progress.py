"""The training log's progress line: steps done / total, images/s, ETA; process 0 only."""

from absl import logging

from simclr_jax import metrics


def test_progress_line_counts_rate_and_eta():
    line = metrics.progress_line(120, 1000, 512.34, 2.0)
    # 880 steps left at 2 steps/s = 440 s.
    assert line == "step 120/1000 (12.0%), 512.3 images/s, ETA 0:07:20"
    assert metrics.progress_line(1000, 1000, 10.0, 1.0).endswith("ETA 0:00:00")
    assert metrics.progress_line(5, 10, 0.0, 0.0).endswith("ETA unknown")
    assert "ETA 27:46:40" in metrics.progress_line(0, 100_000, 1.0, 1.0)


def test_only_process_0_logs_progress(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
    monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
    metrics.log_progress(3, 10, 48.0, 3.0)
    assert lines == []
    monkeypatch.setattr(metrics.jax, "process_index", lambda: 0)
    metrics.log_progress(3, 10, 48.0, 3.0)
    assert lines == ["step 3/10 (30.0%), 48.0 images/s, ETA 0:00:02"]
