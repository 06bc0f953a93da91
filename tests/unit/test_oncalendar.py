"""Cron -> OnCalendar conversion: a table of cases, then systemd's own reading of each."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess

import pytest

from fraisier.cron import CronError, parse_cron
from fraisier.oncalendar import to_oncalendar

CASES = [
    # plain values and stars
    ("0 2 * * *", ("*-*-* 02:00:00",)),
    ("* * * * *", ("*-*-* *:*:00",)),
    ("30 7 * * mon", ("Mon *-*-* 07:30:00",)),
    # lists and ranges
    ("0,30 8-17 * * *", ("*-*-* 08..17:00,30:00",)),
    ("5 1,2,3,9 * * *", ("*-*-* 01..03,09:05:00",)),
    ("0 0 1,15 * *", ("*-*-01,15 00:00:00",)),
    ("0 9 * * 1-5", ("Mon..Fri *-*-* 09:00:00",)),
    ("0 9 * * mon,tue", ("Mon,Tue *-*-* 09:00:00",)),
    ("0 9 * * sat,sun", ("Sat,Sun *-*-* 09:00:00",)),
    ("0 9 * * 0,6,7", ("Sat,Sun *-*-* 09:00:00",)),
    ("0 9 * * 0-6", ("*-*-* 09:00:00",)),
    # steps
    ("*/15 * * * *", ("*-*-* *:00/15:00",)),
    ("5/20 * * * *", ("*-*-* *:05/20:00",)),
    ("0 */6 * * *", ("*-*-* 00/6:00:00",)),
    ("0 8-17/3 * * *", ("*-*-* 08..17/3:00:00",)),
    ("0 0 */2 * *", ("*-*-01/2 00:00:00",)),
    ("0 0 1 */3 *", ("*-01/3-01 00:00:00",)),
    ("0-10/5 * * * *", ("*-*-* *:00..10/5:00",)),
    # month and weekday names
    ("0 12 1 jan,jul *", ("*-01,07-01 12:00:00",)),
    ("0 12 * mar-may fri", ("Fri *-03..05-* 12:00:00",)),
    ("0 6 * DEC Sun", ("Sun *-12-* 06:00:00",)),
    # day of month OR day of week when both are restricted
    ("0 0 13 * fri", ("Fri *-*-* 00:00:00", "*-*-13 00:00:00")),
    ("15 3 1,15 jan-jun mon-fri", ("Mon..Fri *-01..06-* 03:15:00", "*-01..06-01,15 03:15:00")),
    # a day field starting with '*' is not restricted: both must match
    ("0 0 */2 * mon", ("Mon *-*-01/2 00:00:00",)),
    ("0 0 1 * */2", ("Tue,Thu,Sat,Sun *-*-01 00:00:00",)),
    # macros
    ("@hourly", ("*-*-* *:00:00",)),
    ("@daily", ("*-*-* 00:00:00",)),
    ("@midnight", ("*-*-* 00:00:00",)),
    ("@weekly", ("Sun *-*-* 00:00:00",)),
    ("@monthly", ("*-*-01 00:00:00",)),
    ("@yearly", ("*-01-01 00:00:00",)),
    ("@annually", ("*-01-01 00:00:00",)),
    # dates that only some years have
    ("0 0 29 2 *", ("*-02-29 00:00:00",)),
]


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_conversion_table(expression, expected):
    assert to_oncalendar(expression) == expected


def test_parsed_schedule_is_accepted():
    assert to_oncalendar(parse_cron("0 2 * * *")) == ("*-*-* 02:00:00",)


@pytest.mark.parametrize("bad", ["61 * * * *", "* * * * * *", "@reboot", "0 0 31 2 *", "x y"])
def test_invalid_cron_is_refused(bad):
    with pytest.raises(CronError):
        to_oncalendar(bad)


def cron_next(expression: str, after: dt.datetime, count: int, days: int) -> list[dt.datetime]:
    """The next `count` minutes within `days` days at which cron starts the job (reference)."""
    cron = parse_cron(expression)
    found: list[dt.datetime] = []
    day = after.date()
    for _ in range(days):
        midnight = dt.datetime.combine(day, dt.time())
        if cron.matches(midnight.replace(hour=cron.hour[0], minute=cron.minute[0])):
            for hour in cron.hour:
                for minute in cron.minute:
                    moment = midnight.replace(hour=hour, minute=minute)
                    if moment > after:
                        found.append(moment)
                        if len(found) == count:
                            return found
        day += dt.timedelta(days=1)
    return found


def systemd_next(lines: tuple[str, ...], count: int) -> list[dt.datetime]:
    """What systemd-analyze says the timer's lines fire at next, merged, in UTC."""
    out = subprocess.run(
        ["systemd-analyze", "calendar", f"--iterations={count}", *lines],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TZ": "UTC", "LC_ALL": "C"},
    ).stdout
    moments = set()
    for line in out.splitlines():
        label, _, value = line.strip().partition(": ")
        if (label == "Next elapse" or label.startswith("Iter. #")) and value != "never":
            moments.add(dt.datetime.strptime(value, "%a %Y-%m-%d %H:%M:%S UTC"))
    return sorted(moments)[:count]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.parametrize("expression", [case[0] for case in CASES])
def test_systemd_fires_when_cron_would(expression):
    lines = to_oncalendar(expression)
    for _attempt in range(2):
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
        # Nine years hold two 29 Februaries whatever the year is now.
        horizon = dt.datetime.combine(now.date() + dt.timedelta(days=9 * 366), dt.time())
        expected = cron_next(expression, now, 40, 9 * 366)
        got = [m for m in systemd_next(lines, 40) if m < horizon]
        if got == expected:
            return
        # A minute may have turned between the two readings of the clock: ask again.
    assert got == expected
