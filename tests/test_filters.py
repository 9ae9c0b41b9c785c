"""Tests for eventstreams.filters: `filter.<path>=...` query parameters."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from eventstreams.filters import Filter, FilterError, parse_filters, value_text

# Real recentchange events (fields copied from recorded stream data, some trimmed).
DEWIKI_EDIT = {
    "$schema": "/mediawiki/recentchange/1.0.0",
    "meta": {
        "uri": "https://de.wikipedia.org/wiki/Liste_von_Leuchtt%C3%BCrmen_in_D%C3%A4nemark",
        "request_id": "576a48b0-ac16-4bb3-b7d5-308be0b0b5a3",
        "id": "8f6432f1-2ac6-48bc-9dbe-6b734abe937c",
        "dt": "2025-05-03T07:46:28Z",
        "domain": "de.wikipedia.org",
        "stream": "mediawiki.recentchange",
        "topic": "eqiad.mediawiki.recentchange",
        "partition": 0,
        "offset": 5559405453,
    },
    "id": 365743424,
    "type": "edit",
    "namespace": 0,
    "title": "Liste von Leuchttürmen in Dänemark",
    "comment": "Bildwechsel Dueodde Fyr",
    "timestamp": 1746258388,
    "user": "L. Beck",
    "bot": False,
    "minor": False,
    "length": {"old": 27643, "new": 27665},
    "revision": {"old": 249453935, "new": 255680092},
    "server_url": "https://de.wikipedia.org",
    "server_name": "de.wikipedia.org",
    "server_script_path": "/w",
    "wiki": "dewiki",
}

ENWIKI_BOT_EDIT = {
    "$schema": "/mediawiki/recentchange/1.0.0",
    "meta": {
        "uri": "https://en.wikipedia.org/wiki/Template:AFC_statistics/pending",
        "id": "201de526-d3e5-4154-be32-c100ac37f336",
        "dt": "2019-12-03T23:00:20Z",
        "domain": "en.wikipedia.org",
        "stream": "mediawiki.recentchange",
        "topic": "eqiad.mediawiki.recentchange",
        "partition": 0,
        "offset": 2009831377,
    },
    "id": 1210503344,
    "type": "edit",
    "namespace": 10,
    "title": "Template:AFC statistics/pending",
    "timestamp": 1575414020,
    "user": "EarwigBot",
    "bot": True,
    "minor": True,
    "length": {"old": 610892, "new": 610013},
    "revision": {"old": 929136289, "new": 929143609},
    "server_url": "https://en.wikipedia.org",
    "server_name": "en.wikipedia.org",
    "server_script_path": "/w",
    "wiki": "enwiki",
}

WIKIDATA_USER_PAGE_EDIT = {
    "patrolled": True,
    "meta": {
        "offset": 759089587,
        "partition": 0,
        "topic": "eqiad.mediawiki.recentchange",
        "id": "e28114fa-2222-11e8-be37-1418776136da",
        "dt": "2018-03-07T16:16:25+00:00",
        "schema_uri": "mediawiki/recentchange/1",
        "uri": "https://www.wikidata.org/wiki/User:Olaf_Kosinsky/USA_New_York",
        "domain": "www.wikidata.org",
    },
    "server_url": "https://www.wikidata.org",
    "revision": {"new": 645091409, "old": 644584150},
    "length": {"new": 162246, "old": 162246},
    "comment": "Wikidata list updated",
    "minor": True,
    "timestamp": 1520439385,
    "namespace": 2,
    "user": "ListeriaBot",
    "title": "User:Olaf Kosinsky/USA New York",
    "bot": True,
    "server_script_path": "/w",
    "type": "edit",
    "server_name": "www.wikidata.org",
    "wiki": "wikidatawiki",
    "id": 680514464,
}

WIKIDATA_PATROL_LOG = {
    "log_id": 644396877,
    "meta": {
        "offset": 759089909,
        "partition": 0,
        "topic": "eqiad.mediawiki.recentchange",
        "domain": "www.wikidata.org",
    },
    "timestamp": 1520439396,
    "log_type": "patrol",
    "log_params": {"auto": 0},
    "namespace": 0,
    "user": "YMS",
    "title": "Q50356106",
    "id": None,
    "log_action": "patrol",
    "type": "log",
    "server_name": "www.wikidata.org",
    "wiki": "wikidatawiki",
    "bot": False,
}

EVENTS: list[dict] = [DEWIKI_EDIT, ENWIKI_BOT_EDIT, WIKIDATA_USER_PAGE_EDIT, WIKIDATA_PATROL_LOG]


def build(*params: tuple[str, str]) -> Filter:
    result = parse_filters(params)
    assert result is not None
    return result


def matching(*params: tuple[str, str]) -> list[str]:
    """The `user` of each sample event the filter lets through."""
    wanted = build(*params)
    return [event["user"] for event in EVENTS if wanted.matches(event)]


class ParseFiltersTests(SynchronousTestCase):
    def test_no_parameters_gives_none(self) -> None:
        self.assertIsNone(parse_filters([]))

    def test_other_parameters_are_ignored(self) -> None:
        self.assertIsNone(parse_filters([("since", "0"), ("filter", "x"),
                                         ("Filter.wiki", "enwiki"), ("filterwiki", "x")]))

    def test_other_parameters_do_not_change_the_key(self) -> None:
        self.assertEqual(build(("filter.wiki", "enwiki"), ("since", "0")).key,
                         build(("filter.wiki", "enwiki")).key)

    def test_key_is_the_same_in_any_order(self) -> None:
        one = build(("filter.wiki", "enwiki,dewiki"), ("filter.namespace!", "2"),
                    ("filter.bot", "false"))
        other = build(("filter.bot", "false"), ("filter.namespace!", "2"),
                      ("filter.wiki", "dewiki"), ("filter.wiki", "enwiki,dewiki"))
        self.assertEqual(one.key, other.key)
        self.assertEqual(one, other)
        self.assertEqual(hash(one), hash(other))

    def test_key_is_canonical_json(self) -> None:
        self.assertEqual(build(("filter.wiki", "enwiki,dewiki"), ("filter.namespace!", "2")).key,
                         '[["namespace!",["2"]],["wiki",["dewiki","enwiki"]]]')

    def test_negation_changes_the_key(self) -> None:
        self.assertNotEqual(build(("filter.namespace", "2")).key,
                            build(("filter.namespace!", "2")).key)

    def test_different_values_give_different_keys(self) -> None:
        self.assertNotEqual(build(("filter.wiki", "enwiki")), build(("filter.wiki", "dewiki")))

    def test_key_is_unambiguous_with_separator_characters(self) -> None:
        self.assertNotEqual(build(("filter.a", "x&filter.b=y")).key,
                            build(("filter.a", "x"), ("filter.b", "y")).key)

    def test_twenty_names_are_allowed(self) -> None:
        self.assertIsNotNone(parse_filters([(f"filter.f{i}", "x") for i in range(20)]))

    def test_hundred_alternatives_are_allowed(self) -> None:
        value = ",".join(f"v{i}" for i in range(100))
        self.assertIsNotNone(parse_filters([("filter.wiki", value)]))

    def test_repeated_alternatives_count_once(self) -> None:
        self.assertIsNotNone(parse_filters([("filter.wiki", "a")] * 150))

    def test_thousand_character_name_and_value_are_allowed(self) -> None:
        name = "filter." + "a" * 993
        self.assertIsNotNone(parse_filters([(name, "v" * 1000)]))


class ParseFiltersInvalidTests(SynchronousTestCase):
    def assertRejected(self, params: list[tuple[str, str]], message: str) -> None:
        with self.assertRaises(FilterError) as caught:
            parse_filters(params)
        self.assertIn(message, str(caught.exception))

    def test_filter_error_is_a_value_error(self) -> None:
        self.assertRaises(ValueError, parse_filters, [("filter.", "x")])

    def test_empty_path(self) -> None:
        self.assertRejected([("filter.", "x")], "filter.: the path after 'filter.' is empty")

    def test_empty_negated_path(self) -> None:
        self.assertRejected([("filter.!", "x")], "filter.!: the path after 'filter.' is empty")

    def test_empty_segment_in_the_middle(self) -> None:
        self.assertRejected([("filter.a..b", "x")],
                            "filter.a..b: the path 'a..b' has an empty segment")

    def test_empty_leading_segment(self) -> None:
        self.assertRejected([("filter..a", "x")], "has an empty segment")

    def test_empty_trailing_segment(self) -> None:
        self.assertRejected([("filter.a.!", "x")], "filter.a.!: the path 'a.' has an empty segment")

    def test_empty_value(self) -> None:
        self.assertRejected([("filter.wiki", "")], "filter.wiki: the value is empty")

    def test_empty_alternative_in_the_middle(self) -> None:
        self.assertRejected([("filter.wiki", "a,,b")], "filter.wiki: empty alternative in 'a,,b'")

    def test_empty_leading_alternative(self) -> None:
        self.assertRejected([("filter.wiki", ",a")], "empty alternative")

    def test_empty_trailing_alternative(self) -> None:
        self.assertRejected([("filter.wiki!", "a,")], "filter.wiki!: empty alternative")

    def test_more_than_twenty_names(self) -> None:
        self.assertRejected([(f"filter.f{i}", "x") for i in range(21)],
                            "filter.f20: more than 20 different filter names")

    def test_negated_and_plain_count_as_two_names(self) -> None:
        params = [(f"filter.f{i}", "x") for i in range(10)]
        params += [(f"filter.f{i}!", "y") for i in range(11)]
        self.assertRejected(params, "more than 20 different filter names")

    def test_more_than_hundred_alternatives(self) -> None:
        self.assertRejected([("filter.wiki", ",".join(f"v{i}" for i in range(101)))],
                            "filter.wiki: more than 100 alternatives")

    def test_more_than_hundred_alternatives_across_repeats(self) -> None:
        params = [("filter.wiki", f"v{i}") for i in range(101)]
        self.assertRejected(params, "filter.wiki: more than 100 alternatives")

    def test_value_longer_than_thousand_characters(self) -> None:
        self.assertRejected([("filter.wiki", "v" * 1001)],
                            "filter.wiki: value is longer than 1000 characters")

    def test_name_longer_than_thousand_characters(self) -> None:
        with self.assertRaises(FilterError) as caught:
            parse_filters([("filter." + "a" * 994, "x")])
        message = str(caught.exception)
        self.assertIn("filter name is longer than 1000 characters", message)
        self.assertLess(len(message), 200)


class MatchTests(SynchronousTestCase):
    def test_wiki_list(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki,dewiki")), ["L. Beck", "EarwigBot"])

    def test_repeating_a_name_adds_alternatives(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki"), ("filter.wiki", "dewiki")),
                         ["L. Beck", "EarwigBot"])

    def test_bool_false(self) -> None:
        self.assertEqual(matching(("filter.bot", "false")), ["L. Beck", "YMS"])

    def test_bool_true(self) -> None:
        self.assertEqual(matching(("filter.bot", "true")), ["EarwigBot", "ListeriaBot"])

    def test_bool_text_is_case_sensitive(self) -> None:
        self.assertEqual(matching(("filter.bot", "False,FALSE,0")), [])

    def test_glob(self) -> None:
        self.assertEqual(matching(("filter.server_name", "*.wikipedia.org")),
                         ["L. Beck", "EarwigBot"])

    def test_glob_is_case_sensitive(self) -> None:
        self.assertEqual(matching(("filter.server_name", "*.WIKIPEDIA.org")), [])

    def test_question_mark_and_bracket_globs(self) -> None:
        self.assertEqual(matching(("filter.wiki", "??wiki")), ["L. Beck", "EarwigBot"])
        self.assertEqual(matching(("filter.wiki", "[d]*")), ["L. Beck"])

    def test_glob_and_exact_alternatives_mix(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki,wikidata*")),
                         ["EarwigBot", "ListeriaBot", "YMS"])

    def test_dot_in_an_exact_value_is_literal(self) -> None:
        self.assertEqual(matching(("filter.user", "L. Beck")), ["L. Beck"])
        self.assertEqual(matching(("filter.user", "L.XBeck")), [])

    def test_values_are_not_stripped(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki, dewiki")), ["EarwigBot"])

    def test_negated_namespace(self) -> None:
        self.assertEqual(matching(("filter.namespace!", "2")), ["L. Beck", "EarwigBot", "YMS"])

    def test_negation_excludes_every_alternative(self) -> None:
        self.assertEqual(matching(("filter.namespace!", "2,10")), ["L. Beck", "YMS"])

    def test_integer_value(self) -> None:
        self.assertEqual(matching(("filter.namespace", "2,10")), ["EarwigBot", "ListeriaBot"])

    def test_integer_compares_as_decimal_text(self) -> None:
        self.assertEqual(matching(("filter.namespace", "02,+2,2.0")), [])

    def test_integer_with_a_glob(self) -> None:
        self.assertEqual(matching(("filter.namespace", "1*")), ["EarwigBot"])

    def test_negative_integer(self) -> None:
        self.assertTrue(build(("filter.namespace", "-1")).matches({"namespace": -1}))
        self.assertFalse(build(("filter.namespace", "-0")).matches({"namespace": 0}))

    def test_nested_path(self) -> None:
        self.assertEqual(matching(("filter.meta.domain", "www.wikidata.org")),
                         ["ListeriaBot", "YMS"])

    def test_nested_integer(self) -> None:
        self.assertEqual(matching(("filter.length.new", "610013,162246")),
                         ["EarwigBot", "ListeriaBot"])

    def test_several_names_must_all_hold(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki,dewiki,wikidatawiki"),
                                  ("filter.type", "edit"), ("filter.bot", "false")),
                         ["L. Beck"])

    def test_design_example(self) -> None:
        self.assertEqual(matching(("filter.wiki", "enwiki,dewiki"), ("filter.type", "edit"),
                                  ("filter.bot", "false"),
                                  ("filter.server_name", "*.wikipedia.org"),
                                  ("filter.namespace!", "2")),
                         ["L. Beck"])

    def test_same_path_negated_and_plain_both_hold(self) -> None:
        self.assertEqual(matching(("filter.server_name", "*.wikipedia.org"),
                                  ("filter.server_name!", "en.wikipedia.org")),
                         ["L. Beck"])

    def test_missing_path_fails_a_positive_filter(self) -> None:
        self.assertEqual(matching(("filter.log_type", "patrol")), ["YMS"])
        self.assertEqual(matching(("filter.patrolled", "true")), ["ListeriaBot"])

    def test_missing_path_satisfies_a_negated_filter(self) -> None:
        self.assertEqual(matching(("filter.log_type!", "patrol")),
                         ["L. Beck", "EarwigBot", "ListeriaBot"])

    def test_missing_nested_path(self) -> None:
        self.assertEqual(matching(("filter.meta.stream", "mediawiki.recentchange")),
                         ["L. Beck", "EarwigBot"])
        self.assertEqual(matching(("filter.meta.stream!", "mediawiki.recentchange")),
                         ["ListeriaBot", "YMS"])

    def test_path_through_a_scalar_is_missing(self) -> None:
        self.assertEqual(matching(("filter.wiki.length", "6")), [])
        self.assertEqual(len(matching(("filter.wiki.length!", "6"))), 4)

    def test_glob_star_requires_the_path_to_exist(self) -> None:
        self.assertEqual(matching(("filter.log_id", "*")), ["YMS"])

    def test_null_value(self) -> None:
        self.assertEqual(matching(("filter.id", "null")), ["YMS"])

    def test_object_value_compares_as_compact_json(self) -> None:
        self.assertEqual(matching(("filter.log_params", '{"auto":0}')), ["YMS"])

    def test_float_value_compares_as_json_text(self) -> None:
        event = {"score": 0.5, "big": 1e20}
        self.assertTrue(build(("filter.score", "0.5"), ("filter.big", "1e+20")).matches(event))
        self.assertFalse(build(("filter.score", ".5")).matches(event))

    def test_list_index_segment(self) -> None:
        event = {"tags": ["mw-reverted", "visualeditor"]}
        self.assertTrue(build(("filter.tags.1", "visualeditor")).matches(event))
        self.assertFalse(build(("filter.tags.0", "visualeditor")).matches(event))
        self.assertFalse(build(("filter.tags.2", "visualeditor")).matches(event))
        self.assertFalse(build(("filter.tags.01", "visualeditor")).matches(event))

    def test_digit_segment_is_a_key_in_an_object(self) -> None:
        self.assertTrue(build(("filter.a.0", "x")).matches({"a": {"0": "x"}}))

    def test_non_ascii_value(self) -> None:
        self.assertEqual(matching(("filter.title", "Liste von Leuchttürmen in Dänemark")),
                         ["L. Beck"])


class ValueTextTests(SynchronousTestCase):
    def test_texts(self) -> None:
        self.assertEqual(
            [value_text(v) for v in ["a", True, False, None, 12, -3, 0.5, 2.0,
                                     {"a": [1, "é"]}, [1, 2]]],
            ["a", "true", "false", "null", "12", "-3", "0.5", "2.0", '{"a":[1,"é"]}', "[1,2]"])
