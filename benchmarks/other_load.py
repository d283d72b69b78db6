"""`OtherLoad`: how much CPU other processes used while a benchmark ran (Linux `/proc/stat`)."""

import os


class OtherLoad:
    """CPU seconds used by other processes since the last call (Linux): all CPUs' busy time from
    `/proc/stat` minus this process's own CPU time. Near 0 means nobody else competed; the load
    average is no guide, as it counts this process's own threads."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK") - (own.user + own.system)

    def seconds(self):
        now = self._read()
        if now is None or self._last is None:
            return float("nan")
        other, self._last = max(now - self._last, 0.0), now
        return other
