"""The park/wake protocol (`ipc.doorbell`) on a modelled x86-64 store buffer: every interleaving of
a parking reader and a ringer, run through the real code, and no run in which the reader sleeps
past published work without a ring.

The model is x86-TSO (Owens, Sarkar and Sewell, "A better x86 memory model: x86-TSO", TPHOLs
2009): each thread's stores wait in its own FIFO store buffer and reach memory later, in order; a
load reads the thread's newest buffered store to that word, else memory; a fence (MFENCE or a
locked instruction: a lock's compare-and-swap, a semaphore post) first empties its own thread's
buffer. membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) empties every thread's buffer at one instant
of the call (the IPI makes each running thread fence). Aligned 8-byte loads and stores do nothing
else on x86-64 (`ipc.platform`), so a run this model cannot produce, a CPU cannot either.

The real `RingWriter`, `RingReader`, `Doorbell` and `BlockingIdleStrategy` run in one thread per
actor; their shared words are swapped for views of the model, their semaphore for the model's,
and the fences of `ipc.platform.store_load_fences` for the model's. Every shared access is a step
that waits for the scheduler; between steps the scheduler may also move a buffered store to
memory. A depth-first search replays every schedule (stateless model checking: each run forces a
prefix of choices, then takes the first choice at every later step). A reader's wait with nothing
posted ends only when nothing else can move: the ring it waits for never comes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import posix_ipc
import pytest

import ipc.platform
from ipc.doorbell import Doorbell
from ipc.doorbell_fifo import LoopWaiter
from ipc.idle import BlockingIdleStrategy
from ipc.platform import StoreLoadFences
from ipc.ring import _PUBLISHED, Ring, _parked_word

STEP_WAIT_S = 10.0  # an actor that does not reach its next step in this long is hung: fail
# Each scenario has a few hundred schedules; far more means the model or the code under test
# changed shape, and the search should stop and say so rather than run for minutes.
SCHEDULES_MAX = 20_000
DATA = 1
WAIT_TIMEOUT_MS = 1_000.0  # never reached: a wait with nothing posted ends by the scheduler


@dataclass
class Actor:
    name: str
    body: Callable[[], None]
    buffer: deque[tuple[memoryview, int, int]] = field(default_factory=deque)
    pending: tuple[Any, ...] | None = None  # the step it waits to take
    grant: str | None = None  # "step", or "timeout" for a wait nothing will end
    done: bool = False
    error: BaseException | None = None


class Machine:
    """Threads on an x86-TSO machine, scheduled one step at a time by `forced` choices."""

    def __init__(self, forced: list[int]) -> None:
        self.forced = forced
        self.choices: list[tuple[int, int]] = []  # (taken, of how many), per decision
        self.trace: list[str] = []
        self.names: dict[tuple[int, int], str] = {}  # (id(view), index) -> the word's name
        self.actors: list[Actor] = []
        self.by_thread: dict[threading.Thread, Actor] = {}
        self.condition = threading.Condition()

    # ---- the actors' side ----------------------------------------------------------------

    def step(self, *operation: Any) -> Any:
        """Wait for the scheduler's turn, then perform `operation` and return its result."""
        actor = self.by_thread.get(threading.current_thread())
        if actor is None:  # the test setting up, before any actor runs: no buffer, no schedule
            return self._perform(Actor("setup", lambda: None), operation, "step")
        with self.condition:
            actor.pending = operation
            self.condition.notify_all()
            if not self.condition.wait_for(lambda: actor.grant is not None, STEP_WAIT_S):
                raise TimeoutError(f"{actor.name} was never scheduled")
            grant, actor.grant, actor.pending = actor.grant, None, None
            return self._perform(actor, operation, grant)

    def _perform(self, actor: Actor, operation: tuple[Any, ...], grant: str) -> Any:
        kind = operation[0]
        if kind == "load":
            _, view, index = operation
            value = view[index]
            for buffered_view, buffered_index, buffered in actor.buffer:
                if buffered_view is view and buffered_index == index:
                    value = buffered  # store forwarding: a thread sees its own newest store
            self.trace.append(f"{actor.name}: load {self._name(view, index)} -> {value}")
            return value
        self.trace.append(f"{actor.name}: {kind}{'' if grant == 'step' else ' (timed out)'}")
        if kind == "store":
            _, view, index, value = operation
            actor.buffer.append((view, index, value))
            self.trace[-1] = f"{actor.name}: store {self._name(view, index)} = {value} (buffered)"
            return None
        if kind == "fence":
            self._drain(actor)
            return None
        if kind == "membarrier":
            for each in self.actors:
                self._drain(each)
            return None
        if kind == "post":
            _, semaphore = operation
            self._drain(actor)  # sem_post is a locked compare-and-swap; a pipe write takes a mutex
            if semaphore.count_max is None or semaphore.count < semaphore.count_max:
                semaphore.count += 1  # else a full pipe drops it
            return None
        if kind == "acquire":
            _, semaphore, _timeout_s = operation
            if grant == "timeout" or semaphore.count == 0:
                raise posix_ipc.BusyError("modelled timeout")
            self._drain(actor)
            semaphore.count = semaphore.count - 1 if semaphore.count_max is None else 0  # a read takes all
            return None
        if kind == "epoll":  # the event loop's wait on the FIFO: returns once it is readable
            if grant == "timeout":
                raise posix_ipc.BusyError("modelled timeout")
            return None
        raise AssertionError(f"unknown operation {operation!r}")

    def _name(self, view: memoryview, index: int) -> str:
        return self.names.get((id(view), index), f"word {index}")

    def _flush(self, actor: Actor) -> None:
        view, index, value = actor.buffer.popleft()
        view[index] = value
        self.trace.append(f"  {actor.name}'s store of {self._name(view, index)} reaches memory")

    def _drain(self, actor: Actor) -> None:
        while actor.buffer:
            self._flush(actor)

    # ---- the scheduler's side ------------------------------------------------------------

    def _enabled(self, actor: Actor) -> bool:
        operation = actor.pending
        if operation is None:
            return False
        if operation[0] == "acquire":
            _, semaphore, timeout_s = operation
            return semaphore.count > 0 or timeout_s == 0  # a try-wait never blocks
        if operation[0] == "epoll":
            return operation[1].count > 0  # type: ignore[no-any-return]
        return True

    def _observable(self, actor: Actor) -> bool:
        """Whether moving `actor`'s oldest buffered store to memory now can change what another
        actor's next step sees: only if that step loads a word `actor` has buffered. Any other
        flush can wait until such a load, or the end, without changing a result (a reduction of
        the search that keeps every outcome)."""
        words = {(id(view), index) for view, index, _ in actor.buffer}
        for other in self.actors:
            operation = other.pending
            if other is not actor and operation is not None and operation[0] == "load":
                if (id(operation[1]), operation[2]) in words:
                    return True
        return False

    def _choose(self, moves: list[tuple[str, Actor]]) -> tuple[str, Actor]:
        decision = len(self.choices)
        taken = self.forced[decision] if decision < len(self.forced) else 0
        assert taken < len(moves), (taken, len(moves), self.trace)  # replays are deterministic
        self.choices.append((taken, len(moves)))
        return moves[taken]

    def _settled(self) -> bool:
        return all(actor.done or actor.pending is not None for actor in self.actors)

    def run(self, bodies: dict[str, Callable[[], None]]) -> None:
        for name, body in bodies.items():
            actor = Actor(name, body)
            thread = threading.Thread(target=self._thread, args=(actor,), name=f"model-{name}")
            self.actors.append(actor)
            self.by_thread[thread] = actor
        for thread in self.by_thread:
            thread.start()
        try:
            with self.condition:
                while True:
                    if not self.condition.wait_for(self._settled, STEP_WAIT_S):
                        raise TimeoutError(f"an actor hung; trace: {self.trace}")
                    moves = [("step", a) for a in self.actors if self._enabled(a)]
                    moves += [("flush", a) for a in self.actors if self._observable(a)]
                    if not moves:
                        moves = [("flush", a) for a in self.actors if a.buffer]
                    if not moves:
                        blocked = [a for a in self.actors if a.pending is not None]
                        if not blocked:
                            break  # every actor is done and every store is in memory
                        moves = [("timeout", a) for a in blocked]
                    move, actor = self._choose(moves)
                    if move == "flush":
                        self._flush(actor)
                        continue
                    actor.grant = move
                    self.condition.notify_all()
                    self.condition.wait_for(lambda a=actor: a.grant is None, STEP_WAIT_S)
        finally:
            for thread in self.by_thread:
                thread.join(STEP_WAIT_S)
        for actor in self.actors:
            if actor.error is not None:
                raise AssertionError(f"{actor.name} failed; trace: {self.trace}") from actor.error

    def _thread(self, actor: Actor) -> None:
        try:
            actor.body()
        except BaseException as error:
            actor.error = error
        finally:
            with self.condition:
                actor.done = True
                self.condition.notify_all()


class ModelView:
    """A shared word array whose every load and store is a step of the machine."""

    def __init__(self, machine: Machine, view: memoryview) -> None:
        self.machine = machine
        self.view = view

    def __getitem__(self, index: int) -> int:
        return self.machine.step("load", self.view, index)  # type: ignore[no-any-return]

    def __setitem__(self, index: int, value: int) -> None:
        self.machine.step("store", self.view, index, value)


class ModelSemaphore:
    """The doorbell's semaphore: a post and a successful wait are locked instructions."""

    count_max: int | None = None  # a semaphore counts every post

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.count = 0

    def release(self) -> None:
        self.machine.step("post", self)

    def acquire(self, timeout_s: float) -> None:
        self.machine.step("acquire", self, timeout_s)

    @property
    def value(self) -> int:
        """sem_getvalue: the count, read without waiting (the doorbell's drain reads it first)."""
        return self.count

    def close(self) -> None:
        pass


class ModelFifo(ModelSemaphore):
    """The FIFO doorbell (`ipc.doorbell_fifo.FifoBell`) at its worst: a pipe that holds one ring,
    so every ring while one is pending is dropped (`EAGAIN`), and a read swallows all."""

    count_max = 1

    def drain(self) -> int:
        try:
            self.acquire(0)
        except posix_ipc.BusyError:
            return 0
        return 1

    def fileno(self) -> int:
        return -1

    def epoll(self) -> None:
        """The loop's wait: returns when the FIFO is readable; BusyError if nothing will ring."""
        self.machine.step("epoll", self)


class ModelLoop:
    """`add_reader`/`remove_reader` of an event loop; the reader actor runs the wait itself."""

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self.callback = callback

    def remove_reader(self, fd: int) -> bool:
        return True


class ModelLimit:
    """A limit counter (`RingReader(limit=...)` reads only `.word`)."""

    def __init__(self, view: Any) -> None:
        self.word = (view, 0)


def model_fences(machine: Machine, kind: str) -> StoreLoadFences:
    def fence() -> None:
        machine.step("fence")

    def membarrier() -> None:
        machine.step("membarrier")

    if kind == "membarrier":
        return StoreLoadFences("membarrier", membarrier, None)
    if kind == "lock":
        return StoreLoadFences("lock", fence, fence)
    assert kind == "none", kind  # the protocol without fences: what the model must catch
    return StoreLoadFences("none", lambda: None, None)


@dataclass
class Outcome:
    timed_out_with_work: bool
    trace: list[str]


def run_once(
    unique: str, scenario: str, fences: str, forced: list[int], monkeypatch: Any, waiter: str = "idle"
) -> tuple[Outcome, Machine]:
    """One schedule of `scenario`: a reader parks once while one ringer publishes once.

    `waiter`: how the reader waits. "idle": a thread's `BlockingIdleStrategy` on the semaphore;
    "idle_fifo": the same on the FIFO doorbell; "loop": an event loop's `LoopWaiter` on the FIFO
    (it parks once, then waits in the loop's epoll until it has seen the work).
    """
    machine = Machine(forced)
    monkeypatch.setattr(ipc.platform, "_chosen", (os.getpid(), model_fences(machine, fences)), raising=False)
    name = ipc.segment_name(unique, "proto")
    ring = Ring.create(name, 256, readers=("r",))
    real_bell = ring._bells["r"]
    try:
        semaphore = ModelSemaphore(machine) if waiter == "idle" else ModelFifo(machine)
        ring._bells["r"] = Doorbell(real_bell.name, semaphore)  # type: ignore[arg-type]
        writer = ring.writer()
        limit_memory = memoryview(bytearray(8)).cast("q")
        limit = ModelLimit(limit_memory) if scenario == "limit_ring" else None
        reader = ring.reader("r", limit=limit)  # type: ignore[arg-type]
        if scenario == "limit_ring":
            # Published already; the reader waits for the limit (the commit position) to pass it.
            assert writer.try_write(b"8 bytes!", DATA)
        machine.names = {
            (id(ring._control), _PUBLISHED): "published",
            (id(ring._control), _parked_word(0)): "parked",
            (id(limit_memory), 0): "limit",
        }
        shared = ModelView(machine, ring._control)
        writer._control = shared  # type: ignore[assignment]
        reader._control = shared  # type: ignore[assignment]
        if limit is not None:
            reader._limit = (ModelView(machine, limit_memory), 0)  # type: ignore[assignment]
        reader.doorbell = ring._bells["r"].bind((shared, _parked_word(0)), reader.ready)  # type: ignore[arg-type]
        if waiter != "idle":
            reader.doorbell._fifo = semaphore  # type: ignore[assignment]  # a FIFO's drain and wait
        idle = BlockingIdleStrategy(reader.doorbell, WAIT_TIMEOUT_MS, yields_before_park=0)
        seen: list[bool] = []
        frames_expected = 2 if scenario == "two_writes" else 1

        def consume() -> None:
            # Through the real poll when the reader must see more than one publish.
            if frames_expected == 1:
                seen.append(reader.ready())
                return
            seen.extend(True for _ in reader.poll(4))
            reader.release()

        def loop_reader() -> None:
            # The sequencer's shape: park once and watch the FIFO; each wake reads it, then polls.
            loop_waiter = LoopWaiter(ModelLoop(), reader.doorbell, consume, timeout_ms=0)  # the ring alone
            loop_waiter.start()
            while sum(seen) < frames_expected:
                try:
                    semaphore.epoll()  # type: ignore[attr-defined]
                except posix_ipc.BusyError:
                    idle.timeouts += 1  # nothing will ring, and the reader has not seen the work
                    return
                loop_waiter._on_readable()

        def ringer() -> None:
            if scenario == "try_write":
                assert writer.try_write(b"8 bytes!", DATA)
            elif scenario == "two_writes":  # the second lands while the reader handles the first
                assert writer.try_write(b"8 bytes!", DATA)
                assert writer.try_write(b"8 bytes!", DATA)
            elif scenario == "claim_publish":
                view = writer.try_claim(8, DATA)
                assert view is not None
                view[:] = b"8 bytes!"
                writer.publish()
            else:  # the journaller: store the commit position, then ring the blp
                commit = ModelView(machine, limit_memory)
                commit[0] = ring.published_position
                ring._bells["r"].bind((shared, _parked_word(0))).ring()  # type: ignore[arg-type]

        machine.run({"reader": loop_reader if waiter == "loop" else lambda: idle.idle(0), "ringer": ringer})
        reader._control = ring._control
        if limit is not None:
            reader._limit = (limit_memory, 0)
        if scenario != "two_writes":
            assert reader.ready(), "the ringer published work"
        return Outcome(idle.timeouts > 0, machine.trace), machine
    finally:
        ring.close()
        real_bell.close()
        ring.unlink()


def explore(
    unique: str, scenario: str, fences: str, monkeypatch: Any, waiter: str = "idle"
) -> tuple[int, list[Outcome]]:
    """Run every schedule; return how many, and the runs in which the reader slept past work."""
    forced: list[int] = []
    schedules = 0
    missed: list[Outcome] = []
    while True:
        outcome, machine = run_once(unique, scenario, fences, forced, monkeypatch, waiter)
        schedules += 1
        assert schedules <= SCHEDULES_MAX, f"more than {SCHEDULES_MAX} schedules: the search exploded"
        if outcome.timed_out_with_work:
            missed.append(outcome)
        choices = machine.choices
        while choices and choices[-1][0] + 1 >= choices[-1][1]:
            choices.pop()
        if not choices:
            return schedules, missed
        forced = [taken for taken, _ in choices[:-1]] + [choices[-1][0] + 1]


SCENARIOS = ("try_write", "claim_publish", "limit_ring")
WAITERS = ("idle", "idle_fifo", "loop")


def test_a_loop_reader_never_sleeps_past_a_publish_that_lands_while_it_handles_a_wake(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `LoopWaiter` reads the FIFO before it polls: the other order would swallow the ring of a
    # publish its poll did not see. Two publishes, the reader stays parked throughout. (With lock
    # fences the ringer's extra steps take the search past SCHEDULES_MAX; the fence kind does not
    # matter here, the reader does not fence after its start.)
    schedules, missed = explore(unique, "two_writes", "membarrier", monkeypatch, "loop")
    assert schedules > 10, schedules
    assert not missed, (
        f"{len(missed)} of {schedules} schedules leave the loop asleep past the second publish; "
        "the first:\n  " + "\n  ".join(missed[0].trace)
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("fences", ["membarrier", "lock"])
@pytest.mark.parametrize("waiter", WAITERS)
def test_parked_reader_never_sleeps_past_published_work_in_any_store_buffer_interleaving(
    unique: str, monkeypatch: pytest.MonkeyPatch, scenario: str, fences: str, waiter: str
) -> None:
    schedules, missed = explore(unique, scenario, fences, monkeypatch, waiter)
    assert schedules > 10, schedules  # the search did branch
    assert not missed, (
        f"{len(missed)} of {schedules} schedules leave the reader asleep past published work "
        f"with no ring coming; the first:\n  " + "\n  ".join(missed[0].trace)
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("waiter", WAITERS)
def test_without_fences_the_model_finds_the_missed_ring(
    unique: str, monkeypatch: pytest.MonkeyPatch, scenario: str, waiter: str
) -> None:
    # The checker's own check: the protocol without its fences (seqd before this test existed)
    # must fail here, through the store-buffer reordering and nothing else.
    schedules, missed = explore(unique, scenario, "none", monkeypatch, waiter)
    assert missed, f"no missed ring in {schedules} schedules without fences: the model is blind"
    # The ringer loaded the parked flag while the reader's store of it was still buffered.
    trace = missed[0].trace
    assert "ringer: load parked -> 0" in trace, trace
    parked_visible = trace.index("  reader's store of parked reaches memory")
    assert trace.index("ringer: load parked -> 0") < parked_visible, trace
