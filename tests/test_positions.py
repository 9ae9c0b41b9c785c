"""Tests for eventstreams.positions: Last-Event-ID, `since` and event ids."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from eventstreams.positions import (
    Assignment,
    PositionError,
    TimestampError,
    encode_id,
    parse_last_event_id,
    parse_since,
)

# An id as sent by stream.wikimedia.org.
UPSTREAM_ID = (
    '[{"topic":"eqiad.mediawiki.recentchange","partition":0,"timestamp":1670732822001},'
    '{"topic":"codfw.mediawiki.recentchange","partition":0,"offset":-1}]'
)


def one(entry: object) -> str:
    """A Last-Event-ID holding a single entry."""
    return json.dumps([entry])


class ParseLastEventIdValidTests(SynchronousTestCase):
    def test_upstream_id_parses(self) -> None:
        self.assertEqual(parse_last_event_id(UPSTREAM_ID), [
            Assignment("eqiad.mediawiki.recentchange", 0, None, 1670732822001),
            Assignment("codfw.mediawiki.recentchange", 0, None, None),
        ])

    def test_topic_name_means_every_partition(self) -> None:
        self.assertEqual(parse_last_event_id('["eqiad.mediawiki.recentchange"]'),
                         [Assignment("eqiad.mediawiki.recentchange", None, None, None)])

    def test_offset_only_entry(self) -> None:
        self.assertEqual(parse_last_event_id(one({"topic": "t", "partition": 3, "offset": 42})),
                         [Assignment("t", 3, 42, None)])

    def test_offset_and_timestamp_are_both_kept(self) -> None:
        entry = {"topic": "t", "partition": 0, "offset": 12, "timestamp": 1700000000123}
        self.assertEqual(parse_last_event_id(one(entry)),
                         [Assignment("t", 0, 12, 1700000000123)])

    def test_offset_zero_is_a_position(self) -> None:
        self.assertEqual(parse_last_event_id(one({"topic": "t", "partition": 0, "offset": 0})),
                         [Assignment("t", 0, 0, None)])

    def test_offset_minus_one_means_no_position(self) -> None:
        self.assertEqual(parse_last_event_id(one({"topic": "t", "partition": 0, "offset": -1})),
                         [Assignment("t", 0, None, None)])

    def test_partition_alone_has_no_position(self) -> None:
        self.assertEqual(parse_last_event_id(one({"topic": "t", "partition": 7})),
                         [Assignment("t", 7, None, None)])

    def test_timestamp_as_digit_string(self) -> None:
        entry = {"topic": "t", "partition": 0, "timestamp": "1670732822001"}
        self.assertEqual(parse_last_event_id(one(entry)),
                         [Assignment("t", 0, None, 1670732822001)])

    def test_null_offset_and_timestamp_mean_not_given(self) -> None:
        entry = {"topic": "t", "partition": 0, "offset": None, "timestamp": None}
        self.assertEqual(parse_last_event_id(one(entry)), [Assignment("t", 0, None, None)])

    def test_unknown_keys_are_ignored(self) -> None:
        entry = {"topic": "t", "partition": 1, "offset": 5, "dc": "eqiad", "x": [1]}
        self.assertEqual(parse_last_event_id(one(entry)), [Assignment("t", 1, 5, None)])

    def test_order_is_kept_and_partitions_of_one_topic_may_repeat_topic(self) -> None:
        text = json.dumps([
            {"topic": "b", "partition": 1, "offset": 1},
            {"topic": "a", "partition": 0, "offset": 2},
            {"topic": "b", "partition": 0, "offset": 3},
            "c",
        ])
        self.assertEqual([(a.topic, a.partition) for a in parse_last_event_id(text)],
                         [("b", 1), ("a", 0), ("b", 0), ("c", None)])

    def test_surrounding_whitespace_is_allowed(self) -> None:
        self.assertEqual(parse_last_event_id('  ["t"]\n'), [Assignment("t", None, None, None)])

    def test_non_ascii_topic(self) -> None:
        self.assertEqual(parse_last_event_id('["th\\u00e9", {"topic":"\u00e9","partition":0}]'),
                         [Assignment("th\u00e9", None, None, None), Assignment("\u00e9", 0, None, None)])

    def test_int64_maximum_is_accepted(self) -> None:
        entry = {"topic": "t", "partition": 2**31 - 1, "offset": 2**63 - 1,
                 "timestamp": 2**63 - 1}
        self.assertEqual(parse_last_event_id(one(entry)),
                         [Assignment("t", 2**31 - 1, 2**63 - 1, 2**63 - 1)])

    def test_thousand_entries_are_accepted(self) -> None:
        text = json.dumps([{"topic": "t", "partition": i} for i in range(1000)])
        self.assertEqual(len(parse_last_event_id(text)), 1000)

    def test_assignment_is_frozen(self) -> None:
        assignment = parse_last_event_id('["t"]')[0]
        with self.assertRaises(AttributeError):
            assignment.offset = 1  # type: ignore[misc]


class ParseLastEventIdInvalidTests(SynchronousTestCase):
    def assertRejected(self, text: str, message: str) -> None:
        with self.assertRaises(PositionError) as caught:
            parse_last_event_id(text)
        self.assertIn(message, str(caught.exception))

    def test_position_error_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, parse_last_event_id, "")

    def test_empty_text(self) -> None:
        self.assertRejected("", "Last-Event-ID is empty")

    def test_whitespace_only(self) -> None:
        self.assertRejected(" \t ", "Last-Event-ID is empty")

    def test_not_json(self) -> None:
        self.assertRejected("[{topic: t}]", "Last-Event-ID is not JSON")

    def test_truncated_json(self) -> None:
        self.assertRejected('[{"topic":"t","partition":0', "Last-Event-ID is not JSON")

    def test_nan_is_not_json(self) -> None:
        self.assertRejected('[{"topic":"t","partition":0,"offset":NaN}]', "not JSON")

    def test_object_instead_of_array(self) -> None:
        self.assertRejected('{"topic":"t","partition":0}', "must be a JSON array, got object")

    def test_string_instead_of_array(self) -> None:
        self.assertRejected('"t"', "must be a JSON array, got string")

    def test_number_instead_of_array(self) -> None:
        self.assertRejected("5", "must be a JSON array, got number")

    def test_empty_array(self) -> None:
        self.assertRejected("[]", "must not be an empty array")

    def test_more_than_thousand_entries(self) -> None:
        text = json.dumps([{"topic": "t", "partition": i} for i in range(1001)])
        self.assertRejected(text, "has 1001 entries, at most 1000")

    def test_longer_than_64_kib(self) -> None:
        text = '["' + "t" * (64 * 1024) + '"]'
        self.assertRejected(text, "longer than 65536 bytes")

    def test_length_is_counted_in_utf8_bytes(self) -> None:
        text = '["' + "\u00e9" * (33 * 1024) + '"]'  # 33 Ki characters, 66 KiB
        self.assertRejected(text, "longer than 65536 bytes")

    def test_deep_nesting(self) -> None:
        self.assertRejected("[" * 30000 + "]" * 30000, "not JSON")

    def test_number_entry(self) -> None:
        self.assertRejected('["t", 5]', "entry 2: must be a topic name or an object, got number")

    def test_null_entry(self) -> None:
        self.assertRejected("[null]", "entry 1: must be a topic name or an object, got null")

    def test_array_entry(self) -> None:
        self.assertRejected('[["t", 0]]', "entry 1: must be a topic name or an object, got array")

    def test_boolean_entry(self) -> None:
        self.assertRejected("[true]", "entry 1: must be a topic name or an object, got boolean")

    def test_empty_topic_name(self) -> None:
        self.assertRejected('[""]', "entry 1: topic name must not be empty")

    def test_missing_topic(self) -> None:
        self.assertRejected(one({"partition": 0}), "entry 1: 'topic' is missing")

    def test_topic_not_a_string(self) -> None:
        self.assertRejected(one({"topic": 5, "partition": 0}),
                            "entry 1: 'topic' must be a non-empty string, got 5")

    def test_empty_topic(self) -> None:
        self.assertRejected(one({"topic": "", "partition": 0}),
                            "entry 1: 'topic' must be a non-empty string")

    def test_missing_partition(self) -> None:
        self.assertRejected(one({"topic": "t", "offset": 5}), "entry 1: 'partition' is missing")

    def test_negative_partition_message_is_exact(self) -> None:
        with self.assertRaises(PositionError) as caught:
            parse_last_event_id('["a", {"topic":"t","partition":-1}]')
        self.assertEqual(str(caught.exception),
                         "entry 2: 'partition' must be a non-negative integer, got -1")

    def test_boolean_partition(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": False}),
                            "'partition' must be a non-negative integer, got false")

    def test_float_partition(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 1.5}),
                            "'partition' must be a non-negative integer, got 1.5")

    def test_integral_float_partition(self) -> None:
        self.assertRejected('[{"topic":"t","partition":5.0}]',
                            "'partition' must be a non-negative integer, got 5.0")

    def test_string_partition(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": "0"}),
                            "'partition' must be a non-negative integer, got \"0\"")

    def test_null_partition(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": None}),
                            "'partition' must be a non-negative integer, got null")

    def test_partition_beyond_int32(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 2**31}),
                            "'partition' must be at most 2147483647")

    def test_offset_below_minus_one(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "offset": -2}),
                            "entry 1: 'offset' must be an integer >= -1, got -2")

    def test_boolean_offset(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "offset": True}),
                            "'offset' must be an integer >= -1, got true")

    def test_float_offset(self) -> None:
        self.assertRejected('[{"topic":"t","partition":0,"offset":12.0}]',
                            "'offset' must be an integer >= -1, got 12.0")

    def test_string_offset(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "offset": "12"}),
                            "'offset' must be an integer >= -1")

    def test_offset_beyond_int64(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "offset": 2**63}),
                            "'offset' must be at most 9223372036854775807")

    def test_negative_timestamp(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "timestamp": -1}),
                            "'timestamp' must be a non-negative integer, got -1")

    def test_float_timestamp(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "timestamp": 1.5e12}),
                            "'timestamp' must be a non-negative integer")

    def test_boolean_timestamp(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "timestamp": True}),
                            "'timestamp' must be a non-negative integer")

    def test_timestamp_string_that_is_not_digits(self) -> None:
        for value in ["", "12a", "-5", " 12", "1.5", "2024-01-02T00:00:00Z", "\u0661\u0662"]:
            self.assertRejected(one({"topic": "t", "partition": 0, "timestamp": value}),
                                "'timestamp' must be a non-negative integer or a string of digits")

    def test_timestamp_string_beyond_int64(self) -> None:
        self.assertRejected(one({"topic": "t", "partition": 0, "timestamp": "9" * 30}),
                            "'timestamp' must be at most 9223372036854775807")

    def test_same_partition_twice(self) -> None:
        text = json.dumps([{"topic": "t", "partition": 0, "offset": 1},
                           {"topic": "t", "partition": 0, "offset": 2}])
        self.assertRejected(text, "entry 2: topic 't' partition 0 is given twice")

    def test_same_topic_name_twice(self) -> None:
        self.assertRejected('["t", "t"]', "entry 2: topic 't' is given twice")

    def test_topic_by_name_then_as_object(self) -> None:
        self.assertRejected('["t", {"topic":"t","partition":0}]',
                            "entry 2: topic 't' is given both by name and with partitions")

    def test_topic_as_object_then_by_name(self) -> None:
        self.assertRejected('[{"topic":"t","partition":0}, "t"]',
                            "entry 2: topic 't' is given both by name and with partitions")

    def test_duplicate_key_in_an_object(self) -> None:
        self.assertRejected('[{"topic":"t","partition":0,"offset":1,"offset":2}]',
                            "duplicate key 'offset'")


class ParseSinceTests(SynchronousTestCase):
    def test_epoch_milliseconds(self) -> None:
        self.assertEqual(parse_since("1700000000123"), 1700000000123)

    def test_zero(self) -> None:
        self.assertEqual(parse_since("0"), 0)

    def test_whitespace_is_stripped(self) -> None:
        self.assertEqual(parse_since(" 1700000000123\n"), 1700000000123)
        self.assertEqual(parse_since("  2024-01-02T03:04:05Z "), 1704164645000)

    def test_result_is_an_int(self) -> None:
        self.assertIs(type(parse_since("2024-01-02T03:04:05.123Z")), int)

    def test_iso_utc(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04:05Z"), 1704164645000)

    def test_iso_milliseconds_and_offset(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04:05.123+02:00"), 1704157445123)

    def test_iso_negative_offset_without_colon(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04:05-0130"), 1704164645000 + 90 * 60000)

    def test_iso_without_zone_is_utc(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04:05"), 1704164645000)

    def test_iso_date_is_utc_midnight(self) -> None:
        self.assertEqual(parse_since("2024-01-02"), 1704153600000)

    def test_iso_with_space_separator(self) -> None:
        self.assertEqual(parse_since("2024-01-02 03:04:05Z"), 1704164645000)

    def test_iso_without_seconds(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04Z"), 1704164640000)

    def test_iso_lowercase_separators(self) -> None:
        self.assertEqual(parse_since("2024-01-02t03:04:05z"), 1704164645000)

    def test_iso_sub_millisecond_digits_are_truncated(self) -> None:
        self.assertEqual(parse_since("2024-01-02T03:04:05.123999Z"), 1704164645123)

    def test_rfc_2822(self) -> None:
        self.assertEqual(parse_since("Tue, 02 Jan 2024 03:04:05 GMT"), 1704164645000)

    def test_rfc_2822_with_offset(self) -> None:
        self.assertEqual(parse_since("Tue, 02 Jan 2024 05:04:05 +0200"), 1704164645000)

    def test_rfc_2822_without_zone_is_utc(self) -> None:
        self.assertEqual(parse_since("Tue, 02 Jan 2024 03:04:05"), 1704164645000)

    def assertRejected(self, text: str) -> None:
        with self.assertRaises(TimestampError) as caught:
            parse_since(text)
        self.assertIn(repr(text), str(caught.exception))

    def test_timestamp_error_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, parse_since, "abc")

    def test_empty(self) -> None:
        self.assertRejected("")

    def test_whitespace_only(self) -> None:
        self.assertRejected("   ")

    def test_words(self) -> None:
        self.assertRejected("abc")

    def test_fractional_number(self) -> None:
        self.assertRejected("1.5")

    def test_negative_number(self) -> None:
        self.assertRejected("-5")

    def test_exponent_number(self) -> None:
        self.assertRejected("1e12")

    def test_month_thirteen(self) -> None:
        self.assertRejected("2024-13-01")

    def test_february_thirtieth(self) -> None:
        self.assertRejected("2024-02-30")

    def test_hour_twenty_five(self) -> None:
        self.assertRejected("2024-01-02T25:00:00Z")

    def test_offset_out_of_range(self) -> None:
        self.assertRejected("2024-01-02T03:04:05+24:00")

    def test_trailing_garbage_after_iso(self) -> None:
        self.assertRejected("2024-01-02T03:04:05Z junk")

    def test_bad_rfc_2822_day(self) -> None:
        self.assertRejected("Tue, 32 Jan 2024 03:04:05 GMT")

    def test_date_before_1970(self) -> None:
        self.assertRejected("1969-12-31T23:59:59Z")

    def test_number_beyond_javascript_dates(self) -> None:
        self.assertRejected("8640000000000001")
        self.assertRejected("9" * 5000)


class EncodeIdTests(SynchronousTestCase):
    def test_byte_exact_output(self) -> None:
        self.assertEqual(
            encode_id([("eqiad.mediawiki.recentchange", 0, 1042, 1700000000123),
                       ("codfw.mediawiki.recentchange", 0, 7, None)]),
            '[{"topic":"eqiad.mediawiki.recentchange","partition":0,"offset":1042,'
            '"timestamp":1700000000123},'
            '{"topic":"codfw.mediawiki.recentchange","partition":0,"offset":7}]')

    def test_order_is_kept(self) -> None:
        self.assertEqual(encode_id([("b", 1, 2, None), ("a", 0, 1, None)]),
                         '[{"topic":"b","partition":1,"offset":2},'
                         '{"topic":"a","partition":0,"offset":1}]')

    def test_accepts_a_generator(self) -> None:
        self.assertEqual(encode_id((("t", p, 0, 5) for p in range(2))),
                         '[{"topic":"t","partition":0,"offset":0,"timestamp":5},'
                         '{"topic":"t","partition":1,"offset":0,"timestamp":5}]')

    def test_empty(self) -> None:
        self.assertEqual(encode_id([]), "[]")

    def test_non_ascii_is_raw_and_quotes_are_escaped(self) -> None:
        self.assertEqual(encode_id([('th\u00e9"x', 0, 1, None)]),
                         '[{"topic":"th\u00e9\\"x","partition":0,"offset":1}]')

    def test_round_trip_through_last_event_id(self) -> None:
        entries = [("eqiad.mediawiki.recentchange", 0, 1042, 1700000000123),
                   ("codfw.mediawiki.recentchange", 3, 0, None)]
        self.assertEqual(parse_last_event_id(encode_id(entries)),
                         [Assignment(*entry) for entry in entries])
