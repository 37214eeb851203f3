"""``StreamSource``: the trainer's samples, streamed from producers through Mooncake.

A prefetch thread pops ``SampleRef``s from this rank's queue (the key queue deals the sample at
epoch position ``pos`` to rank ``pos % ranks``), reads their tensors from Mooncake and buffers them; ``next_step`` collates them with
the trainer's ``collate``. After the optimizer step the trainer calls ``ack``: the objects are
force-deleted and the bytes go back to the producers' budget. A rank that has taken every sample
dealt to it returns padding steps, so all ranks keep stepping together until the trainer's all-reduce sees no real sample anywhere.

Contract with the trainer: call ``ack`` once per optimizer step on every rank (with ``[]`` when the
step had no real samples). ``state_dict`` then waits until every rank has acked the same number of
steps and returns the run's *global* acked set, so any rank's state is a complete checkpoint.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections import defaultdict, deque
from typing import Any, Optional

from spec_core.config import TransferConfig
from spec_core.contracts.samples import CapturedSample, tensor_names
from spec_core.errors import ConfigError, ServiceError
from spec_core.training.collate import collate, padding_sample
from spec_core.training.job import TrainJob
from spec_core.training.sources import SampleSource, SampleSpec, StepData
from spec_core.transfer.mooncake import MissingDataError
from spec_core.transfer.records import SampleRef
from spec_core.transfer.services import ServiceAddresses
from spec_core.utils import faults

log = logging.getLogger(__name__)


class StreamSource(SampleSource):
    def __init__(
        self,
        addresses: ServiceAddresses,
        transfer: TransferConfig,
        spec: SampleSpec,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accumulation_steps: int,
        seq_bucket: int,
        prefetch_depth: int = 2,
    ) -> None:
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.accumulation_steps = micro_batch_size, accumulation_steps
        self.seq_bucket = seq_bucket
        self.pop_timeout_s = transfer.pop_timeout_s
        self.queue = addresses.connect_queue(transfer.connect_timeout_s)
        self.plan = self.queue.plan(transfer.pop_timeout_s)
        if self.plan.num_ranks != world_size:
            raise ConfigError(
                f"the stream deals samples to {self.plan.num_ranks} trainer ranks but this run has "
                f"{world_size}; set training.nproc_per_node x training.nnodes to match"
            )
        self.store = addresses.connect_store(transfer)
        # A restarted rank re-sends itself what its predecessor popped but did not ack.
        resent = self.queue.recover_rank(rank)
        if resent:
            log.info("rank %d: recovered %d published, unacked samples", rank, resent)
        self._buffer: queue_mod.Queue[tuple[SampleRef, CapturedSample]] = queue_mod.Queue(
            maxsize=max(prefetch_depth, 1) * micro_batch_size
        )
        self._inflight: dict[str, deque[SampleRef]] = defaultdict(deque)
        self._dry = False  # set by the prefetch thread under _dry_lock; see _prefetch
        self._dry_lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._acks_done = 0  # ack calls in this run (other ranks make as many: see state_dict)
        self._acks_before = 0  # steps acked before a resume
        self._gate_opened = False
        self.stats = {"fetched": 0, "fetched_bytes": 0, "fetch_s": 0.0, "missing_requeued": 0}
        self._thread = threading.Thread(
            target=self._prefetch, name=f"stream-prefetch-{rank}", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_job(cls, job: TrainJob, rank: int, world_size: int, spec: SampleSpec) -> StreamSource:
        if not job.services:
            raise ServiceError("TrainJob.source is 'stream' but the job has no service addresses")
        cfg = job.cfg
        return cls(
            ServiceAddresses.from_dict(job.services),
            cfg.transfer,
            spec,
            rank=rank,
            world_size=world_size,
            micro_batch_size=cfg.training.micro_batch_size,
            accumulation_steps=cfg.training.accumulation_steps,
            seq_bucket=cfg.training.seq_bucket,
            prefetch_depth=cfg.training.prefetch_depth,
        )

    # ---- prefetch thread ------------------------------------------------------------------------

    def _prefetch(self) -> None:
        names = tensor_names(self.spec.with_last_hidden)
        delay = 0.005
        try:
            while not self._stop.is_set():
                with self._dry_lock:
                    ref = self.queue.try_pop(self.rank)
                    if ref is None:
                        # Checked under the lock so next_step never sees "dry" while a popped
                        # ref is still on its way into the buffer.
                        self._dry = self.queue.end_of_data(self.rank)
                    else:
                        self._dry = False
                if ref is None:
                    self._stop.wait(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                delay = 0.005
                sample = self._fetch(ref, names)
                if sample is None:
                    continue
                while not self._stop.is_set():
                    try:
                        self._buffer.put((ref, sample), timeout=0.1)
                        break
                    except queue_mod.Full:
                        continue
        except BaseException as exc:  # surfaced to the trainer by next_step
            self._error = exc

    def _fetch(self, ref: SampleRef, names: tuple[str, ...]) -> Optional[CapturedSample]:
        present = [n for n in names if n in ref.tensors]
        metas = [ref.tensors[n] for n in present]
        t0 = time.monotonic()
        try:
            faults.point("stream.fetch")
            tensors = dict(zip(present, self.store.get(metas), strict=True))
        except MissingDataError as exc:
            # The data went away (its holder died or it was evicted): hand the id back for
            # re-production instead of training on nothing or failing the run.
            if self.queue.requeue_missing(ref):
                self.stats["missing_requeued"] += 1
            log.warning(
                "rank %d: %s; sample %s re-queued for production", self.rank, exc, ref.sample_id
            )
            return None
        self.stats["fetch_s"] += time.monotonic() - t0
        self.stats["fetched"] += 1
        self.stats["fetched_bytes"] += sum(m.nbytes for m in metas)
        return CapturedSample.from_tensors(ref.sample_id, tensors)

    # ---- SampleSource ---------------------------------------------------------------------------

    def _next_sample(self) -> tuple[Optional[CapturedSample], float]:
        """The next buffered sample, or None once this rank's data has ended; plus wait time."""
        t0 = time.monotonic()
        while True:
            if self._error is not None:
                raise ServiceError(f"stream prefetch failed: {self._error}") from self._error
            try:
                ref, sample = self._buffer.get(timeout=0.1)  # wakes at once on data
            except queue_mod.Empty:
                with self._dry_lock:
                    if self._dry and self._buffer.empty():
                        return None, time.monotonic() - t0
                if self.queue.stop_requested():
                    raise ServiceError(
                        f"rank {self.rank}: the stream stopped before the data ended: "
                        f"{self.queue.stop_reason()}"
                    ) from None
                if time.monotonic() - t0 > self.pop_timeout_s:
                    raise ServiceError(
                        f"rank {self.rank}: no sample arrived for {self.pop_timeout_s:.0f}s and the "
                        "data has not ended; are the producers running? (transfer.pop_timeout_s)"
                    ) from None
                continue
            self._inflight[ref.sample_id].append(ref)
            return sample, time.monotonic() - t0

    def next_step(self) -> StepData:
        if not self._gate_opened:
            if self.rank == 0:  # acked ids (if resuming) are restored by now: producers may start
                self.queue.open_gate()
            self._gate_opened = True
        micro_batches = []
        exhausted = False
        for _ in range(self.accumulation_steps):
            samples: list[CapturedSample] = []
            wait = 0.0
            while len(samples) < self.micro_batch_size and not exhausted:
                sample, waited = self._next_sample()
                wait += waited
                if sample is None:
                    exhausted = True
                else:
                    samples.append(sample)
            length = max((int(s.input_ids.shape[0]) for s in samples), default=self.seq_bucket)
            samples += [
                padding_sample(self.spec, length)
                for _ in range(self.micro_batch_size - len(samples))
            ]
            batch = collate(samples, self.spec, self.seq_bucket)
            batch.data_wait_s = wait
            micro_batches.append(batch)
        return StepData(micro_batches=micro_batches)

    def ack(self, sample_ids: list[str]) -> None:
        refs = []
        for sid in sample_ids:
            pending = self._inflight.get(sid)
            if not pending:
                raise ValueError(
                    f"ack of sample {sid!r} that this source did not hand out (or acked twice)"
                )
            refs.append(pending.popleft())
            if not pending:
                del self._inflight[sid]
        # Delete the data before giving the bytes back, so residency never exceeds the budget. A
        # rank killed between the two finds the sample unacked on restart, its data gone, and
        # has it produced again: nothing is acked that was not trained (§key-queue).
        faults.point("stream.ack.remove")
        self.store.remove([k for ref in refs for k in ref.keys])
        self.queue.ack(refs)
        self._acks_done += 1

    def state_dict(self) -> dict[str, Any]:
        """The run's acked ids once every rank has acked as many steps as this one."""
        want = self._acks_done * self.world_size
        deadline = time.monotonic() + self.pop_timeout_s
        while self.queue.ack_calls() < want:
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"rank {self.rank}: other ranks did not ack step {self._acks_done} within "
                    f"{self.pop_timeout_s:.0f}s (every rank must call ack once per step)"
                )
            time.sleep(0.01)
        return {
            "acked": [[epoch, sid] for epoch, sid in self.queue.acked()],
            "steps_acked": self._acks_before + self._acks_done,
            "missing_requeued": self.stats["missing_requeued"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pairs = [(int(e), str(s)) for e, s in state.get("acked", [])]
        restored = self.queue.mark_acked(pairs)
        self._acks_before = int(state.get("steps_acked", 0))
        log.info(
            "rank %d: restored %d acked samples (%d new to this run)",
            self.rank,
            len(pairs),
            restored,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.store.close()
