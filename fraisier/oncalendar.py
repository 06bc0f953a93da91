"""Cron schedules as systemd ``OnCalendar=`` lines.

A timer fires when any of its ``OnCalendar=`` lines matches, and within one line the
weekday and the date must both match. Cron runs a job when the day of month *or* the
day of week matches if both fields are restricted, so such a schedule becomes two
lines: one per day field. Every other schedule is one line.
"""

from __future__ import annotations

from fraisier.cron import FIELDS, CronSchedule, parse_cron

__all__ = ["to_oncalendar"]

_BOUNDS = {name: (low, high) for name, low, high in FIELDS}
# systemd weeks start on Monday; cron's 0 is Sunday.
_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_MONDAY_FIRST = (1, 2, 3, 4, 5, 6, 0)


def to_oncalendar(schedule: CronSchedule | str) -> tuple[str, ...]:
    """OnCalendar= expressions that together fire exactly when cron would run `schedule`."""
    cron = parse_cron(schedule) if isinstance(schedule, str) else schedule
    time = f"{_numbers(cron.hour, 'hour')}:{_numbers(cron.minute, 'minute')}:00"
    month = _numbers(cron.month, "month")
    if cron.dom_restricted and cron.dow_restricted:
        by_weekday = f"{_weekdays(cron.day_of_week)} *-{month}-* {time}".lstrip()
        by_date = f"*-{month}-{_numbers(cron.day_of_month, 'day-of-month')} {time}"
        return _unique(by_weekday, by_date)
    # Otherwise cron wants both day fields to match, which is what one line means.
    weekday = _weekdays(cron.day_of_week)
    date = f"*-{month}-{_numbers(cron.day_of_month, 'day-of-month')}"
    return (f"{weekday} {date} {time}".lstrip(),)


def _unique(*lines: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(lines))


def _numbers(values: tuple[int, ...], field: str) -> str:
    low, high = _BOUNDS[field]
    if values == tuple(range(low, high + 1)):
        return "*"
    if len(values) >= 3:
        step = values[1] - values[0]
        if step > 1 and values == tuple(range(values[0], values[-1] + 1, step)):
            start = f"{values[0]:02d}"
            # `start/step` repeats up to the end of the field; a range stops at its last value.
            if values[-1] + step > high:
                return f"{start}/{step}"
            return f"{start}..{values[-1]:02d}/{step}"
    return ",".join(
        f"{first:02d}..{last:02d}" if last - first >= 2 else
        ",".join(f"{v:02d}" for v in range(first, last + 1))
        for first, last in _runs(values)
    )  # fmt: skip


def _weekdays(days: tuple[int, ...]) -> str:
    """Weekday names in systemd's Monday-first order, '' when every day is allowed."""
    if set(days) >= set(range(7)):
        return ""
    positions = sorted(_MONDAY_FIRST.index(d) for d in days)
    parts = []
    for first, last in _runs(tuple(positions)):
        names = [_WEEKDAYS[_MONDAY_FIRST[p]] for p in range(first, last + 1)]
        parts.append(f"{names[0]}..{names[-1]}" if len(names) >= 3 else ",".join(names))
    return ",".join(parts)


def _runs(values: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive stretches of sorted values as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs
