"""The stages after intake: upload, poll, fetch, finish. Each is a loop over ledger rows.

The ledger is the queue: every stage picks rows that are due in its state, announces
what it is about to do with a compare-and-set transition, does it, and records the
outcome. A crash between any two lines leaves rows in a state the next start resumes
from (see :mod:`dhwatch.states`).
"""

from dhwatch.stages.fetcher import Fetcher
from dhwatch.stages.finisher import Finisher
from dhwatch.stages.poller import Poller
from dhwatch.stages.uploader import Uploader

__all__ = ["Fetcher", "Finisher", "Poller", "Uploader"]
