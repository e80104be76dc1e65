"""
L{Waiters}: many callers waiting for one outcome (a connection being
opened, a domain pair being authenticated), each with its own Deferred.
"""

from twisted.internet import defer
from twisted.python.failure import Failure


class Waiters:
    """
    The callers waiting for one outcome.  Each gets a fresh L{Deferred}
    from L{wait}, so one caller's callbacks never change what another sees.
    """

    def __init__(self):
        self._waiting = []

    def wait(self):
        """
        @return: a L{Deferred} that fires with the outcome.
        """
        deferred = defer.Deferred()
        self._waiting.append(deferred)
        return deferred

    def fire(self, result):
        """
        Give every waiter C{result} (a value or a L{Failure}).
        """
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            if deferred.called:
                # Cancelled (or timed out) by its caller.
                continue
            if isinstance(result, Failure):
                deferred.errback(result)
            else:
                deferred.callback(result)

    def __len__(self):
        return len(self._waiting)
