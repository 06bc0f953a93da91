"""The 5-field cron parser behind `schedule:`."""

from __future__ import annotations

import datetime as dt

import pytest

from fraisier.cron import CronError, parse_cron

ALL_MINUTES = tuple(range(60))
ALL_HOURS = tuple(range(24))
ALL_DAYS = tuple(range(1, 32))
ALL_MONTHS = tuple(range(1, 13))
ALL_WEEKDAYS = tuple(range(7))


@pytest.mark.parametrize(
    ("expr", "minute", "hour", "dom", "month", "dow"),
    [
        ("0 2 * * *", (0,), (2,), ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("0 */6 * * *", (0,), (0, 6, 12, 18), ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("*/15 * * * *", (0, 15, 30, 45), ALL_HOURS, ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("1-10/2 * * * *", (1, 3, 5, 7, 9), ALL_HOURS, ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("5/20 * * * *", (5, 25, 45), ALL_HOURS, ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("0,30 8-17 * * 1-5", (0, 30), tuple(range(8, 18)), ALL_DAYS, ALL_MONTHS, (1, 2, 3, 4, 5)),
        ("0 0 1 jan,JUL *", (0,), (0,), (1,), (1, 7), ALL_WEEKDAYS),
        ("0 0 * * Mon-Fri", (0,), (0,), ALL_DAYS, ALL_MONTHS, (1, 2, 3, 4, 5)),
        ("0 0 * * 7", (0,), (0,), ALL_DAYS, ALL_MONTHS, (0,)),
        ("0 0 * * sun,7,0", (0,), (0,), ALL_DAYS, ALL_MONTHS, (0,)),
        ("59 23 31 12 6", (59,), (23,), (31,), (12,), (6,)),
        ("  0   1  *  *  *  ", (0,), (1,), ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("@hourly", (0,), ALL_HOURS, ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("@daily", (0,), (0,), ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("@midnight", (0,), (0,), ALL_DAYS, ALL_MONTHS, ALL_WEEKDAYS),
        ("@weekly", (0,), (0,), ALL_DAYS, ALL_MONTHS, (0,)),
        ("@monthly", (0,), (0,), (1,), ALL_MONTHS, ALL_WEEKDAYS),
        ("@yearly", (0,), (0,), (1,), (1,), ALL_WEEKDAYS),
        ("@ANNUALLY", (0,), (0,), (1,), (1,), ALL_WEEKDAYS),
    ],
)
def test_good_expressions(expr, minute, hour, dom, month, dow):
    schedule = parse_cron(expr)
    assert schedule.expression == expr
    assert schedule.minute == minute
    assert schedule.hour == hour
    assert schedule.day_of_month == dom
    assert schedule.month == month
    assert schedule.day_of_week == dow


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("61 * * * *", "minute 61 out of range 0-59"),
        ("* 24 * * *", "hour 24 out of range 0-23"),
        ("* * 0 * *", "day-of-month 0 out of range 1-31"),
        ("* * * 13 *", "month 13 out of range 1-12"),
        ("* * * * 8", "day-of-week 8 out of range 0-7"),
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("0 0 * * * *", "got 6; seconds, years and commands do not belong in a schedule"),
        ("", "the expression is empty"),
        ("*/0 * * * *", "minute step in '*/0' must be at least 1"),
        ("*/x * * * *", "minute step 'x' in '*/x' is not a number"),
        ("10-5 * * * *", "minute range '10-5' runs backwards"),
        ("1,,2 * * * *", "minute field '1,,2' has an empty list element"),
        ("* * * foo *", "month value 'foo' is not a number (names: jan, feb"),
        ("* * * * funday", "day-of-week value 'funday' is not a number (names: sun, mon"),
        ("* * * mon *", "month value 'mon' is not a number"),
        ("*/90 * * * *", "minute step 90 is larger than the field (0-59)"),
        ("0 0 30 2 *", "day 30 never occurs in February, so the job never runs"),
        ("0 0 31 4,6 *", "day 31 never occurs in April, June"),
        ("@reboot", "@reboot is not supported: jobs run from systemd timers"),
        ("@often", "unknown macro '@often' (known: @yearly"),
        ("- * * * *", "minute has an empty value"),
    ],
)
def test_bad_expressions(expr, reason):
    with pytest.raises(CronError) as caught:
        parse_cron(expr)
    assert str(caught.value).startswith(f"invalid cron expression {expr!r}: ")
    assert reason in caught.value.reason
    assert isinstance(caught.value, ValueError)


def test_restricted_flags_follow_crons_first_character_rule():
    assert not parse_cron("0 2 * * *").dom_restricted
    assert not parse_cron("0 2 * * *").dow_restricted
    both = parse_cron("0 0 1,15 * mon")
    assert both.dom_restricted and both.dow_restricted
    assert both.restricted == frozenset({"minute", "hour", "day-of-month", "day-of-week"})
    # cron treats a field starting with '*' as unrestricted even with a step
    assert not parse_cron("0 0 */2 * mon").dom_restricted


def test_matches_uses_or_when_both_day_fields_are_restricted():
    both = parse_cron("0 0 13 * fri")
    assert both.matches(dt.datetime(2024, 3, 13, 0, 0))  # a Wednesday, the 13th
    assert both.matches(dt.datetime(2024, 3, 15, 0, 0))  # a Friday, the 15th
    assert not both.matches(dt.datetime(2024, 3, 14, 0, 0))
    assert not both.matches(dt.datetime(2024, 3, 15, 0, 1))


def test_matches_uses_and_when_one_day_field_is_a_star():
    odd_mondays = parse_cron("30 6 */2 * mon")
    assert odd_mondays.matches(dt.datetime(2024, 4, 1, 6, 30))  # Monday the 1st
    assert not odd_mondays.matches(dt.datetime(2024, 4, 8, 6, 30))  # Monday the 8th
    assert not odd_mondays.matches(dt.datetime(2024, 4, 3, 6, 30))  # Wednesday the 3rd


def test_sunday_as_seven_matches_sunday():
    assert parse_cron("0 0 * * 7").matches(dt.datetime(2024, 3, 17, 0, 0))


def test_non_string_is_refused():
    with pytest.raises(CronError, match="expected a string"):
        parse_cron(5)  # type: ignore[arg-type]
