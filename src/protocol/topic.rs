//! Topic matching (spec §4.7): whether a filter matches a topic name, or covers another
//! filter. The subscription trie and the retained tree search many filters or topics at once;
//! these functions test one pair, for per-filter queue policies and ACL rules.

/// Whether the topic name `topic` matches the filter `filter`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    // A topic name holds no wildcards [MQTT-3.3.2-2], and a filter covers a wildcard-free
    // filter exactly when it matches that topic.
    filter_covers(filter, topic)
}

/// Whether every topic that `inner` matches is matched by `outer`.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    // [MQTT-4.7.2-1]: a leading wildcard never reaches `$` topics; the inner filter reaches
    // them only if it starts with `$` itself.
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut inner_levels = inner.split('/');
    for level in outer.split('/') {
        if level == "#" {
            // `a/#` also matches `a` [MQTT-4.7.1-2].
            return true;
        }
        match inner_levels.next() {
            Some("#") => return false,
            Some("+") if level != "+" => return false,
            Some(_) if level == "+" => {}
            Some(inner_level) if inner_level == level => {}
            _ => return false,
        }
    }
    inner_levels.next().is_none()
}

/// The matching rules written as plainly as possible, and the specification's examples that
/// pin them down: the oracle of the trie's, the retained tree's and the ACL's tests.
#[cfg(test)]
pub(crate) mod examples {
    /// The matching rules of MQTT §4.7 level by level, as the oracle.
    pub(crate) fn naive_matches(filter: &str, topic: &str) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let topic: Vec<&str> = topic.split('/').collect();
        if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
            return false;
        }
        let mut i = 0;
        loop {
            match (filter.get(i), topic.get(i)) {
                (Some(&"#"), _) => return true,
                (None, None) => return true,
                (Some(&"+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                _ => return false,
            }
            i += 1;
        }
    }

    /// (filter, topic, matches): MQTT 3.1.1 §4.7.1.2, the multi-level wildcard.
    pub(crate) const MULTI_LEVEL_WILDCARD: &[(&str, &str, bool)] = &[
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/tennis/player1/#", "sport/tennis/player2", false),
        ("sport/tennis/player1/#", "sport/tennis", false),
        ("sport/#", "sport", true),
        ("sport/#", "sport/", true),
        ("sport/#", "sport/a/b", true),
        ("sport/#", "sports", false),
        ("#", "sport", true),
        ("#", "sport/tennis/player1", true),
        ("#", "/", true),
    ];

    /// MQTT 3.1.1 §4.7.1.3, the single-level wildcard.
    pub(crate) const SINGLE_LEVEL_WILDCARD: &[(&str, &str, bool)] = &[
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player2", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("+/tennis/#", "sport/tennis/player1", true),
        ("+/tennis/#", "sport/tennis", true),
        ("sport/+/player1", "sport/tennis/player1", true),
        ("+/#", "sport", true),
    ];

    /// MQTT 3.1.1 §4.7.2 [MQTT-4.7.2-1]: wildcards in the first level never match `$` topics;
    /// only the first character of the topic name counts.
    pub(crate) const DOLLAR_TOPICS: &[(&str, &str, bool)] = &[
        ("#", "$SYS/monitor/Clients", false),
        ("#", "$SYS", false),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("+", "$", false),
        ("+/x", "$a/x", false),
        ("+/#", "$a/x", false),
        ("$SYS/#", "$SYS/monitor/Clients", true),
        ("$SYS/#", "$SYS/x", true),
        ("$SYS/#", "$SYS", true),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("a/+", "a/$b", true),
        ("a/#", "a/$b", true),
        ("#", "a$", true),
        ("+/x", "/x", true),
    ];

    /// Empty levels are levels.
    pub(crate) const EMPTY_LEVELS: &[(&str, &str, bool)] = &[
        ("a//b", "a//b", true),
        ("a//b", "a/b", false),
        ("a/+/b", "a//b", true),
        ("/a", "/a", true),
        ("/a", "a", false),
        ("a", "/a", false),
        ("a/", "a/", true),
        ("a/", "a", false),
        ("a/+", "a/", true),
        ("+/+", "/", true),
        ("+", "/", false),
        ("/#", "/", true),
        ("/#", "/a/b", true),
        ("/#", "a", false),
        ("//", "//", true),
        ("//", "/", false),
    ];

    /// MQTT 3.1.1 §4.7.3 [MQTT-4.7.3-4]: levels compare byte for byte.
    pub(crate) const BYTE_FOR_BYTE: &[(&str, &str, bool)] = &[
        ("ACCOUNTS", "ACCOUNTS", true),
        ("ACCOUNTS", "Accounts", false),
        ("Accounts payable", "Accounts payable", true),
        ("Accounts payable", "Accounts  payable", false),
        ("/finance", "finance", false),
        ("caf\u{e9}", "cafe\u{301}", false),
    ];

    /// Every table above.
    pub(crate) fn all() -> impl Iterator<Item = (&'static str, &'static str, bool)> {
        [
            MULTI_LEVEL_WILDCARD,
            SINGLE_LEVEL_WILDCARD,
            DOLLAR_TOPICS,
            EMPTY_LEVELS,
            BYTE_FOR_BYTE,
        ]
        .into_iter()
        .flatten()
        .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::examples::{all, naive_matches};
    use super::*;

    #[test]
    fn the_specification_examples_hold_for_both_matchers() {
        for (filter, topic, expected) in all() {
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "{filter:?} {topic:?}"
            );
            assert_eq!(
                naive_matches(filter, topic),
                expected,
                "oracle: {filter:?} {topic:?}"
            );
        }
    }

    #[test]
    fn a_filter_covers_the_filters_it_matches_more_of() {
        assert!(filter_covers("a/#", "a/+/b"));
        assert!(filter_covers("a/+/b", "a/x/b"));
        assert!(!filter_covers("a/+/b", "a/#"));
        assert!(!filter_covers("a/x/b", "a/+/b"));
        assert!(filter_covers("#", "a/#"));
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(filter_covers("$SYS/#", "$SYS/+"));
    }
}
