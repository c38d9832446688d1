"""Job files for ``rw submit`` (pure: parsing only, no sockets)."""

from __future__ import annotations

import json
import time

import pytest

from respworkers.errors import JobFileError
from respworkers.jobfile import parse

pytestmark = pytest.mark.timeout(60)

MULTI_LINE = """\
[
  {"payload": "a",
   "id": "first"},
  {
    "payload": "b"
  }, {"payload": "c"},

  {"payload": "d", "tries": 2}
]
"""


def test_array_jobs_carry_the_line_they_start_on() -> None:
    jobs = parse(MULTI_LINE, "jobs.json")
    assert [(j.payload, j.line) for j in jobs] == [(b"a", 2), (b"b", 4), (b"c", 6), (b"d", 8)]
    assert jobs[0].id == "first" and jobs[3].tries == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (MULTI_LINE.replace('"tries": 2', '"prio": 2'), "jobs.json: line 8 (job 4): unknown field 'prio'"),
        (MULTI_LINE.replace('{"payload": "c"}', '{"payload": "c"} {"payload": "e"}'),
         "jobs.json: line 6: invalid JSON: expected ',' or ']'"),
        (MULTI_LINE + "\n  junk\n", "jobs.json: line 11: text after the array"),
        ('[\n {"payload": "a"},\n\n {"payload": \n}\n]', "jobs.json: line 5: invalid JSON"),
    ],
)
def test_array_errors_name_the_right_line(text: str, message: str) -> None:
    with pytest.raises(JobFileError) as err:
        parse(text, "jobs.json")
    assert str(err.value).startswith(message), str(err.value)


def test_json_lines_numbers_count_newlines_only() -> None:
    # U+2028 and U+0085 are legal unescaped inside JSON strings; they do not end a line here.
    text = '{"payload": "a\u2028b"}\n\n{"payload": "c\u0085d", "id": "x"}\r\n{"payload": "e", "prio": 1}\n'
    with pytest.raises(JobFileError, match=r"^f: line 4: unknown field 'prio'"):
        parse(text, "f")
    jobs = parse(text.rsplit("{", 1)[0], "f")
    assert [(j.payload.decode(), j.line) for j in jobs] == [("a\u2028b", 1), ("c\u0085d", 3)]


def test_large_array_parses_in_linear_time() -> None:
    # Counting lines from the start for every job made 50,000 jobs take about a minute;
    # linear parsing takes well under a second, so 5 s leaves room for a busy machine.
    # benchmarks/jobfile.py measures the growth itself (time of 40k jobs / 10k jobs).
    n = 50_000
    text = "[\n" + ",\n".join(json.dumps({"payload": f"job {i}"}) for i in range(n)) + "\n]\n"
    started = time.perf_counter()
    jobs = parse(text, "big.json")
    took = time.perf_counter() - started
    assert len(jobs) == n and jobs[-1].line == n + 1
    assert took < 5.0, f"parsing {n} jobs took {took:.1f}s"


def test_content_ids_name_the_same_jobs_for_the_same_bytes() -> None:
    from respworkers.jobfile import content_ids
    from respworkers.protocol import check_job_id

    first, same, other = content_ids(b"[1]"), content_ids(b"[1]"), content_ids(b"[1] ")
    assert [first(n) for n in (1, 2, 10_000)] == [same(n) for n in (1, 2, 10_000)]
    assert first(1) != first(2) and first(1) != other(1)
    assert check_job_id(first(10_000).encode()) == first(10_000)
