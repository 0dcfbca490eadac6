"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges read at scrape time and cumulative histograms: the handful of kinds a
serving process needs. Every metric is named ``llama_*``; histograms have ``_bucket``,
``_sum`` and ``_count`` series as Prometheus expects. All updates happen on the event
loop's thread; a scrape reads them there too.
"""

import bisect
from typing import Callable, Dict, List, Sequence, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
                   10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: Dict[Tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        key = tuple(label_values)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> List[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return out


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> List[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self) -> List[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            cumulative += c
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """The server's metrics; ``render`` adds the gauges ``gauges`` reads at scrape time."""

    def __init__(self):
        self.http_requests = Counter("llama_http_requests_total", "HTTP requests answered, by path and status code.",
                                     ("path", "status"))
        self.requests = Counter("llama_requests_total",
                                "Completion choices finished, by finish reason (stop, length, content_filter, "
                                "error, aborted).", ("finish_reason",))
        self.prompt_tokens = Counter("llama_prompt_tokens_total", "Prompt tokens of the requests admitted.")
        self.generation_tokens = Counter("llama_generation_tokens_total", "Tokens generated (kept in replies).")
        self.ttft = Histogram("llama_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token.", LATENCY_BUCKETS)
        self.itl = Histogram("llama_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.", LATENCY_BUCKETS)
        self.duration = Histogram("llama_request_duration_seconds",
                                  "From a request's arrival to its last token.", DURATION_BUCKETS)
        self.gauges: List[Gauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def render(self) -> str:
        lines: List[str] = []
        for m in [self.http_requests, self.requests, self.prompt_tokens, self.generation_tokens, *self.gauges,
                  self.ttft, self.itl, self.duration]:
            lines += m.render()
        return "\n".join(lines) + "\n"


def parse(text: str) -> Dict[str, float]:
    """``{series: value}`` of an exposition text (for tests and the benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values
