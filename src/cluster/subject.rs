//! MQTT topics and filters as NATS subjects and key-value keys.
//!
//! A topic level becomes one NATS token. Bytes outside `[A-Za-z0-9_-]` are written `=XX` (hex),
//! which covers every character NATS gives a meaning to (`.`, `*`, `>`, whitespace) and keeps
//! the result a legal key-value key too (keys allow only `[-/_=.A-Za-z0-9]`). An empty level
//! is the token `=` alone, which no escape produces, so every legal MQTT topic round-trips.
//!
//! Topics starting with `$` live under their own root: a filter whose first level is a wildcard
//! must not match them [MQTT-4.7.2-1], and a separate root lets the subject `<root>.>` say so
//! without the receiving node filtering them out again.

use std::fmt::Write;

use crate::config::is_name_byte;

/// The token of an empty topic level.
const EMPTY_LEVEL: &str = "=";

/// Subject roots under the cluster prefix: ordinary topics and `$` topics.
const ROOT_PLAIN: &str = "t";
const ROOT_DOLLAR: &str = "d";

/// The token under the cluster prefix, ahead of the roots, of the QoS 1/2 copies only shared
/// groups take: plain subscriptions get QoS 1/2 through the replication log or directly (see
/// `cluster::direct`), and a node does not subscribe to these for them.
const SHARED_ONLY: &str = "s";

/// Writes one topic level (or any string) as a NATS token.
pub fn push_token(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push_str(EMPTY_LEVEL);
        return;
    }
    for byte in level.bytes() {
        if is_name_byte(byte) {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "={byte:02X}");
        }
    }
}

/// One string as one token.
pub fn token(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    push_token(&mut out, text);
    out
}

fn root(topic_or_filter: &str) -> &'static str {
    if topic_or_filter.starts_with('$') {
        ROOT_DOLLAR
    } else {
        ROOT_PLAIN
    }
}

/// The subject a message on `topic` is published to: `<base>.<root>.<level>...`.
pub fn topic_subject(base: &str, topic: &str) -> String {
    subject_under(base, None, topic)
}

/// The subject a QoS 1/2 message on `topic` is forwarded to for shared groups only.
pub fn shared_only_topic_subject(base: &str, topic: &str) -> String {
    subject_under(base, Some(SHARED_ONLY), topic)
}

/// `<base>[.<extra>].<root>.<level>...`, in one allocation: it is made for every message a
/// node forwards.
fn subject_under(base: &str, extra: Option<&str>, topic: &str) -> String {
    let mut out = String::with_capacity(base.len() + 5 + topic.len() * 2);
    out.push_str(base);
    if let Some(extra) = extra {
        out.push('.');
        out.push_str(extra);
    }
    out.push('.');
    out.push_str(root(topic));
    for level in topic.split('/') {
        out.push('.');
        push_token(&mut out, level);
    }
    out
}

/// The subject patterns a shared group's QoS 1/2 copies come on (see [`filter_subjects`]).
pub fn shared_only_filter_subjects(base: &str, filter: &str) -> Vec<String> {
    filter_subjects(&format!("{base}.{SHARED_ONLY}"), filter)
}

/// The topic of a subject made by [`topic_subject`] or [`shared_only_topic_subject`]; `None`
/// for anything else.
pub fn subject_topic(base: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(base)?.strip_prefix('.')?;
    let rest = rest
        .strip_prefix(SHARED_ONLY)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(rest);
    let (root, levels) = rest.split_once('.')?;
    if root != ROOT_PLAIN && root != ROOT_DOLLAR {
        return None;
    }
    let mut topic = Vec::with_capacity(levels.len());
    for (i, level) in levels.split('.').enumerate() {
        if i > 0 {
            topic.push(b'/');
        }
        decode_token(level, &mut topic)?;
    }
    let topic = String::from_utf8(topic).ok()?;
    (topic.starts_with('$') == (root == ROOT_DOLLAR)).then_some(topic)
}

fn decode_token(token: &str, out: &mut Vec<u8>) -> Option<()> {
    if token == EMPTY_LEVEL {
        return Some(());
    }
    let bytes = token.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' => {
                let hex = token.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if is_name_byte(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    (!token.is_empty()).then_some(())
}

/// The subjects a node subscribes to for an MQTT filter: one, or two for a filter ending in
/// `#`, which also matches its parent level (`a/#` matches `a`) [MQTT-4.7.1-2].
pub fn filter_subjects(base: &str, filter: &str) -> Vec<String> {
    let mut out = String::with_capacity(base.len() + 3 + filter.len() * 2);
    out.push_str(base);
    out.push('.');
    out.push_str(root(filter));
    let mut parent = None;
    for level in filter.split('/') {
        match level {
            "#" => {
                parent = Some(out.clone());
                out.push_str(".>");
            }
            "+" => out.push_str(".*"),
            level => {
                out.push('.');
                push_token(&mut out, level);
            }
        }
    }
    match parent {
        // `#` alone matches every topic but has no parent level to match.
        Some(parent) if filter != "#" => vec![out, parent],
        _ => vec![out],
    }
}

/// Whether a NATS subject pattern (tokens, `*`, a final `>`) matches a literal subject.
pub fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for wanted in pattern.split('.') {
        if wanted == ">" {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(token) if wanted == "*" || wanted == token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether some subject matches both NATS subject patterns.
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut a_tokens = a.split('.');
    let mut b_tokens = b.split('.');
    loop {
        match (a_tokens.next(), b_tokens.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            _ => return false,
        }
    }
}

/// A key-value key for a string (a client id): the token, or a digest of it when the token
/// would make an unwieldy subject. The value stored under it names the string in full.
pub fn key(text: &str) -> String {
    const LONGEST: usize = 200;
    let token = token(text);
    if token.len() <= LONGEST {
        return token;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut out = String::from("==");
    for byte in digest.as_ref() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod overlap_tests {
    use super::*;

    #[test]
    fn patterns_overlap_when_some_subject_matches_both() {
        assert!(patterns_overlap("a.*", "a.>"));
        assert!(patterns_overlap("a.*.c", "a.b.*"));
        assert!(patterns_overlap("a.b", "a.b"));
        assert!(!patterns_overlap("a", "a.>"));
        assert!(!patterns_overlap("a.*", "a.b.c"));
        assert!(!patterns_overlap("a.b", "a.c"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::topic::filter_matches;
    use proptest::prelude::*;

    const BASE: &str = "telemq";

    fn legal_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
    }

    #[test]
    fn levels_nats_gives_a_meaning_to_are_escaped() {
        assert_eq!(
            topic_subject(BASE, "a.b/*/>/ /x"),
            "telemq.t.a=2Eb.=2A.=3E.=20.x"
        );
        assert_eq!(topic_subject(BASE, "/a//"), "telemq.t.=.a.=.=");
        assert_eq!(topic_subject(BASE, "$SYS/x"), "telemq.d.=24SYS.x");
        assert_eq!(topic_subject(BASE, "a=b"), "telemq.t.a=3Db");
    }

    #[test]
    fn filters_become_patterns_and_hash_covers_the_parent() {
        assert_eq!(filter_subjects(BASE, "a/+/c"), vec!["telemq.t.a.*.c"]);
        assert_eq!(filter_subjects(BASE, "#"), vec!["telemq.t.>"]);
        assert_eq!(
            filter_subjects(BASE, "a/#"),
            vec!["telemq.t.a.>", "telemq.t.a"]
        );
        assert_eq!(filter_subjects(BASE, "$SYS/#")[0], "telemq.d.=24SYS.>");
        assert_eq!(filter_subjects(BASE, "+/x"), vec!["telemq.t.*.x"]);
    }

    #[test]
    fn foreign_subjects_are_not_topics() {
        assert_eq!(subject_topic(BASE, "other.t.a"), None);
        assert_eq!(subject_topic(BASE, "telemq.x.a"), None);
        assert_eq!(subject_topic(BASE, "telemq.t.a=G1"), None);
        assert_eq!(subject_topic(BASE, "telemq.s.x.a"), None);
        assert_eq!(subject_topic(BASE, "telemq.s.t.a"), Some("a".into()));
        assert_eq!(
            subject_topic(BASE, "telemq.t.=24a"),
            None,
            "a $ topic under the plain root"
        );
    }

    #[test]
    fn long_keys_are_digested() {
        let long = "x".repeat(500);
        let key = key(&long);
        assert!(key.starts_with("==") && key.len() == 66);
        assert_ne!(key, super::key(&"x".repeat(501)));
        assert_eq!(super::key("sensor-1"), "sensor-1");
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof!["[a-c]{0,2}", "[.*> =$/]{1}", "\\PC{0,3}"], 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("a legal topic", |topic| {
                !topic.is_empty() && !topic.contains(['+', '#', '\0'])
            })
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof!["[a-c$]{0,2}", Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#".into());
                }
                levels.join("/")
            })
    }

    proptest! {
        #[test]
        fn every_topic_round_trips_through_legal_tokens(topic in topic_strategy()) {
            let subject = topic_subject(BASE, &topic);
            prop_assert!(subject.split('.').skip(1).all(legal_token), "{subject}");
            prop_assert_eq!(subject_topic(BASE, &subject), Some(topic.clone()));
            let shared_only = shared_only_topic_subject(BASE, &topic);
            prop_assert!(shared_only.split('.').skip(1).all(legal_token), "{shared_only}");
            prop_assert_eq!(subject_topic(BASE, &shared_only), Some(topic));
        }

        /// The NATS interest of a filter is exactly the MQTT match: a node gets what its
        /// filters match and nothing else.
        #[test]
        fn subjects_match_as_the_filter_does(
            filter in filter_strategy(),
            topic in prop::collection::vec("[a-c$]{0,2}", 1..5)
                .prop_map(|l| l.join("/"))
                .prop_filter("a legal topic", |t| !t.is_empty()),
        ) {
            let by_nats = filter_subjects(BASE, &filter)
                .iter()
                .any(|pattern| pattern_matches(pattern, &topic_subject(BASE, &topic)));
            prop_assert_eq!(by_nats, filter_matches(&filter, &topic), "{} on {}", filter, topic);
            let shared_only = shared_only_topic_subject(BASE, &topic);
            let by_shared_group = shared_only_filter_subjects(BASE, &filter)
                .iter()
                .any(|pattern| pattern_matches(pattern, &shared_only));
            prop_assert_eq!(by_shared_group, by_nats, "{} on {}", filter, topic);
            let by_plain_subscription = filter_subjects(BASE, &filter)
                .iter()
                .any(|pattern| pattern_matches(pattern, &shared_only));
            prop_assert!(!by_plain_subscription, "a plain subscription gets no shared-only copy");
        }
    }
}
