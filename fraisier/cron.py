"""Five-field cron expressions: parsing and validation.

A parsed schedule keeps the expanded value set of every field and which fields were
restricted, which is what a conversion to a systemd ``OnCalendar=`` line needs: cron
runs a job when the day of month *or* the day of week matches if both are restricted,
and when both match otherwise.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

__all__ = ["FIELDS", "MACROS", "CronError", "CronSchedule", "parse_cron"]

# (name used in messages, lowest, highest)
FIELDS: tuple[tuple[str, int, int], ...] = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)

MACROS: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTH_NAMES = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_NAMES = {"month": _MONTH_NAMES, "day-of-week": _DAY_NAMES}
# The longest each month can be, leap years included, to refuse dates that never come.
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30}
_MONTH_DAYS[12] = 31


class CronError(ValueError):
    """A cron expression that cannot be parsed; ``reason`` says precisely why."""

    def __init__(self, expression: str, reason: str):
        super().__init__(f"invalid cron expression {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron schedule: the values each field allows, as sorted tuples."""

    expression: str
    minute: tuple[int, ...]
    hour: tuple[int, ...]
    day_of_month: tuple[int, ...]
    month: tuple[int, ...]
    day_of_week: tuple[int, ...]  # 0 is Sunday; 7 is folded into 0
    # Names of the fields (as in FIELDS) that did not start with '*'. Cron itself decides
    # "restricted" on that first character, so `*/2` in day-of-month counts as unrestricted.
    restricted: frozenset[str]

    @property
    def dom_restricted(self) -> bool:
        """Whether the day-of-month field narrows the days."""
        return "day-of-month" in self.restricted

    @property
    def dow_restricted(self) -> bool:
        """Whether the day-of-week field narrows the days."""
        return "day-of-week" in self.restricted

    def matches(self, moment: dt.datetime) -> bool:
        """Whether cron would start the job at this minute."""
        if moment.minute not in self.minute or moment.hour not in self.hour:
            return False
        if moment.month not in self.month:
            return False
        dom_ok = moment.day in self.day_of_month
        dow_ok = moment.isoweekday() % 7 in self.day_of_week
        if self.dom_restricted and self.dow_restricted:
            return dom_ok or dow_ok
        return dom_ok and dow_ok


def parse_cron(expr: str) -> CronSchedule:
    """Parse a 5-field cron expression or an @macro; raise CronError saying what is wrong."""
    if not isinstance(expr, str):
        raise CronError(str(expr), f"expected a string, got {type(expr).__name__}")
    text = expr.strip()
    if not text:
        raise CronError(expr, "the expression is empty")
    if text.startswith("@"):
        macro = text.lower()
        if macro == "@reboot":
            raise CronError(
                expr,
                "@reboot is not supported: jobs run from systemd timers, which fire at "
                "calendar times; to start something at boot, enable a service instead",
            )
        if macro not in MACROS:
            known = ", ".join(MACROS)
            raise CronError(expr, f"unknown macro {text!r} (known: {known})")
        text = MACROS[macro]
    parts = text.split()
    if len(parts) != len(FIELDS):
        raise CronError(
            expr,
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
            + ("; seconds, years and commands do not belong in a schedule" if parts else ""),
        )
    values: list[tuple[int, ...]] = []
    restricted = set()
    for part, (name, low, high) in zip(parts, FIELDS, strict=True):
        values.append(_parse_field(expr, part, name, low, high))
        if not part.startswith("*"):
            restricted.add(name)
    minute, hour, dom, month, dow = values
    dow = tuple(sorted({d % 7 for d in dow}))
    if "day-of-month" in restricted and "day-of-week" not in restricted:
        longest = max(_MONTH_DAYS[m] for m in month)
        if min(dom) > longest:
            months = ", ".join(calendar.month_name[m] for m in month)
            raise CronError(expr, f"day {min(dom)} never occurs in {months}, so the job never runs")
    return CronSchedule(
        expression=expr,
        minute=minute,
        hour=hour,
        day_of_month=dom,
        month=month,
        day_of_week=dow,
        restricted=frozenset(restricted),
    )


def _parse_field(expr: str, text: str, name: str, low: int, high: int) -> tuple[int, ...]:
    found: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(expr, f"{name} field {text!r} has an empty list element")
        found.update(_parse_item(expr, item, name, low, high))
    return tuple(sorted(found))


def _parse_item(expr: str, item: str, name: str, low: int, high: int) -> range:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit():
            raise CronError(expr, f"{name} step {step_text!r} in {item!r} is not a number")
        step = int(step_text)
        if step == 0:
            raise CronError(expr, f"{name} step in {item!r} must be at least 1")
    if base == "*":
        start, end = low, high
    elif "-" in base:
        first, _, last = base.partition("-")
        start = _value(expr, first, name, low, high)
        end = _value(expr, last, name, low, high)
        if start > end:
            raise CronError(expr, f"{name} range {base!r} runs backwards")
    else:
        start = _value(expr, base, name, low, high)
        # `5/15` means "from 5, every 15", as most crons read it.
        end = high if slash else start
    if slash and step > high - low + 1:
        raise CronError(expr, f"{name} step {step} is larger than the field ({low}-{high})")
    return range(start, end + 1, step)


def _value(expr: str, text: str, name: str, low: int, high: int) -> int:
    names = _NAMES.get(name, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        if not text:
            raise CronError(expr, f"{name} has an empty value")
        hint = f" (names: {', '.join(names)})" if names else ""
        raise CronError(expr, f"{name} value {text!r} is not a number{hint}")
    number = int(text)
    if not low <= number <= high:
        raise CronError(expr, f"{name} {number} out of range {low}-{high}")
    return number
