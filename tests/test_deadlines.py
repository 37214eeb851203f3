"""Waits with a deadline and one clear error naming what was waited for (docs/architecture.md
§processes, the deadlines table): the regeneration lock here; the Mooncake client's close in
test_transfer_services, torchrun in test_train_restart, a child run in test_deploy_stack."""

from __future__ import annotations

import fcntl
import os

import pytest

from spec_core.data.regenerate import _exclusive
from spec_core.errors import ServiceError


def test_regeneration_lock_waits_until_its_deadline_and_names_the_holder(tmp_path):
    lock = tmp_path / ".lock"
    with lock.open("a+") as other:  # another process's open file description, same semantics
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        with pytest.raises(ServiceError, match=r"pid 4242.*dataset.regenerate.lock_timeout_s"):
            with _exclusive(lock, timeout_s=0.3):
                pass
    with _exclusive(lock, timeout_s=0.3):  # released: taken at once, our pid recorded
        assert lock.read_text() == str(os.getpid())
