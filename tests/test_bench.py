"""The timing primitive: the stream-hold decision, the adaptive sample count, the wall-clock path, and the
event path against a simulated GPU stream (so CI shows that a slow-to-dispatch call is not charged its
host time); the same check on a real GPU runs when one is present."""
import contextlib
import math
import time

import pytest
import torch

from q4lab import bench


def busy_wait_us(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


# --- the hold decision -------------------------------------------------------------------------------

def test_hold_outlasts_the_host_queue_time_with_margin():
    for queue_us in (0.0, 5.0, 50.0, 400.0, 10_000.0):
        hold = bench.hold_us_for(queue_us)
        assert hold >= bench.HOLD_FLOOR_US
        assert hold >= 2 * queue_us
        assert bench.was_held(queue_us, hold)


def test_a_sample_whose_host_outran_the_hold_does_not_count():
    assert bench.was_held(79.0, 100.0)
    assert not bench.was_held(81.0, 100.0)
    assert not bench.was_held(150.0, 100.0)


def test_spin_cycles_cover_the_hold():
    rate = 1755.0  # cycles per µs (an H100's SM clock)
    for hold in (20.0, 33.3, 1000.0):
        cycles = bench.spin_cycles(hold, rate)
        assert cycles / rate >= hold
        assert cycles / rate < hold + 1 / rate + 1e-9


def test_median_confidence_interval_shrinks_with_samples_and_noise():
    assert bench.median_ci_rel([10.0] * 20) == 0.0
    noisy = [10.0 + (i % 7) for i in range(20)]
    assert bench.median_ci_rel(noisy) > 0.05
    assert bench.median_ci_rel(noisy * 20) < bench.median_ci_rel(noisy)


# --- the wall clock (CPU) ----------------------------------------------------------------------------

def test_wall_clock_times_a_known_duration():
    t = bench.time_call(lambda: busy_wait_us(300), device="cpu")
    assert t.timer == "wall_clock" and t.cold is False and t.hold_us == 0
    assert 300 <= t.time_us < 400
    assert t.time_us_lo <= t.time_us <= t.time_us_hi
    assert t.samples == len(t.samples_us) >= 10
    assert t.host_us >= 300


def test_sample_count_adapts_to_noise():
    steady = bench.time_call(lambda: busy_wait_us(200), device="cpu", max_samples=100, budget_s=5)
    calls = iter(range(10**6))
    noisy = bench.time_call(lambda: busy_wait_us(100 + 300 * (next(calls) % 2)), device="cpu",
                            max_samples=100, budget_s=5)
    assert steady.samples < 100
    assert noisy.samples == 100


def test_budget_caps_the_samples():
    calls = iter(range(10**6))
    t = bench.time_call(lambda: busy_wait_us(1000 + 2000 * (next(calls) % 2)), device="cpu",
                        min_samples=5, max_samples=10_000, budget_s=0.05)
    assert 5 <= t.samples < 60


def test_bad_sample_limits_are_refused():
    with pytest.raises(ValueError, match="min_samples"):
        bench.time_call(lambda: None, device="cpu", min_samples=10, max_samples=5)


def test_cpu_probes_and_facts():
    facts = bench.device_facts("cpu")
    assert facts["vendor"] == "cpu" and facts["timer"] == "wall_clock" and facts["device"].startswith("cpu: ")
    assert facts["torch_version"] == torch.__version__
    assert 0.5 < bench.device_gbps("cpu") < 10_000
    assert 0 < bench.launch_us("cpu") < 1000


# --- the event path against a simulated GPU stream ---------------------------------------------------

class FakeStream:
    """One in-order GPU stream in virtual time (µs on the host's clock): an op starts when the one before
    it ended or when the host queued it, whichever is later; an event completes at that moment."""

    LAUNCH_LATENCY_US = 3.0
    CYCLES_PER_US = 1000.0

    def __init__(self):
        self.free_at = 0.0

    @staticmethod
    def now() -> float:
        return time.perf_counter() * 1e6

    def run(self, duration_us: float) -> None:
        self.free_at = max(self.free_at, self.now() + self.LAUNCH_LATENCY_US) + duration_us

    def synchronize(self, device=None) -> None:
        wait = self.free_at - self.now()
        if wait > 0:
            time.sleep(wait / 1e6)

    def event(self, enable_timing=True):
        stream = self

        class Event:
            def record(self):
                stream.run(0.0)
                self.at = stream.free_at

            def elapsed_time(self, end):  # ms, as torch's
                return (end.at - self.at) / 1e3

            def synchronize(self):
                stream.synchronize()

        return Event()


@pytest.fixture
def stream(monkeypatch):
    s = FakeStream()

    class FlushBuffer:
        def zero_(self):
            s.run(30.0)  # a 30 µs L2 flush: shorter than the slow dispatch below

    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: s.run(cycles / s.CYCLES_PER_US))
    monkeypatch.setattr(torch.cuda, "Event", s.event)
    monkeypatch.setattr(torch.cuda, "synchronize", s.synchronize)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(bench, "_flush_buffer", lambda device: FlushBuffer())
    monkeypatch.setattr(bench, "_cycles_per_us", lambda device: s.CYCLES_PER_US)
    return s


GPU = torch.device("cuda", 0)
KERNEL_US = 5.0


def naive_event_time_us(stream: FakeStream, fn) -> float:
    """What event timing without a hold measures: flush, start, fn, end."""
    start, end = stream.event(), stream.event()
    FakeStream.run(stream, 30.0)
    start.record()
    fn()
    end.record()
    stream.synchronize()
    return start.elapsed_time(end) * 1e3


def test_slow_dispatch_is_not_charged_to_device_time(stream):
    def fast_call():
        stream.run(KERNEL_US)

    def slow_call():  # a Python wrapper that takes ~200 µs before it launches the same kernel
        time.sleep(200e-6)
        stream.run(KERNEL_US)

    assert naive_event_time_us(stream, slow_call) > 150  # the simulation shows the problem ...
    fast = bench.time_call(fast_call, device=GPU)
    slow = bench.time_call(slow_call, device=GPU)
    assert fast.timer == slow.timer == "cuda_events" and slow.cold
    assert fast.time_us == pytest.approx(KERNEL_US)      # ... and the hold removes it
    assert slow.time_us == pytest.approx(KERNEL_US)
    assert slow.hold_us >= 2 * 200
    assert slow.host_us >= 200                          # the host cost is reported beside it


def test_a_host_hiccup_is_rejected_and_the_hold_grows(stream):
    calls = iter(range(10**6))

    def call():
        if next(calls) == 8:  # one call stalls (GC, page fault, another thread) far past the hold
            time.sleep(3e-3)
        stream.run(KERNEL_US)

    t = bench.time_call(call, device=GPU)
    assert t.rejected >= 1
    assert t.hold_us >= 2 * 3000
    assert t.time_us == pytest.approx(KERNEL_US)
    assert max(t.samples_us) == pytest.approx(KERNEL_US)


def test_warm_up_is_excluded(stream):
    calls = iter(range(10**6))
    t = bench.time_call(lambda: stream.run(2000.0 if next(calls) == 0 else KERNEL_US), device=GPU)
    assert max(t.samples_us) == pytest.approx(KERNEL_US)


def test_a_call_that_synchronizes_is_refused(stream):
    def syncing_call():
        stream.run(KERNEL_US)
        stream.synchronize()

    with pytest.raises(RuntimeError, match="synchronizes"):
        bench.time_call(syncing_call, device=GPU)


# --- a real GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_real_gpu_slow_dispatch_does_not_inflate_device_time():
    x = torch.zeros(1 << 16, device="cuda")

    def slow():
        time.sleep(200e-6)
        x.add_(1)

    fast = bench.time_call(lambda: x.add_(1), device="cuda")
    slowed = bench.time_call(slow, device="cuda")
    assert math.isclose(slowed.time_us, fast.time_us, rel_tol=0.10), (fast, slowed)
    assert slowed.host_us > 200 > fast.time_us
