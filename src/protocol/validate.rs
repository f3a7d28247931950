//! Topic name and topic filter rules (spec §4.7, §4.8.2) that the wire codec does not check.

use super::reason::{ProtocolError, ReasonCode};

/// A topic name in a PUBLISH or will: non-empty [MQTT-4.7.3-1] and free of wildcards [MQTT-3.3.2-2].
/// Well-formed UTF-8 without U+0000 is checked when the string is decoded.
pub fn check_topic_name(topic: &str) -> Result<(), ProtocolError> {
    if topic.is_empty() {
        return Err(ProtocolError::new(
            ReasonCode::TopicNameInvalid,
            "[MQTT-4.7.3-1] topic name is empty",
        ));
    }
    if topic.contains(['+', '#']) {
        return Err(ProtocolError::new(
            ReasonCode::TopicNameInvalid,
            "[MQTT-3.3.2-2] topic name contains a wildcard character",
        ));
    }
    Ok(())
}

/// Whether `filter` is a syntactically valid (non-shared) topic filter.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        // [MQTT-4.7.3-1]
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            // [MQTT-4.7.1-2] '#' stands alone in the last level
            return false;
        }
        if level.contains('+') && level != "+" {
            // [MQTT-4.7.1-3] '+' occupies a whole level
            return false;
        }
    }
    true
}

/// Group name of `$queue/{filter}` subscriptions (EMQX's shorthand for one shared queue).
pub const QUEUE_GROUP: &str = "queue";

/// A filter of the form `$share/{ShareName}/{filter}` (or `$queue/{filter}`, the group
/// [`QUEUE_GROUP`]) split into its parts, or `None` when the filter is not a shared
/// subscription.
pub fn split_shared(filter: &str) -> Option<Result<(&str, &str), ()>> {
    if let Some(inner) = filter.strip_prefix("$queue/") {
        return Some(if is_valid_filter(inner) {
            Ok((QUEUE_GROUP, inner))
        } else {
            Err(())
        });
    }
    let rest = filter.strip_prefix("$share/")?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    // [MQTT-4.8.2-1] ShareName is at least one character without '/', '+' or '#';
    // [MQTT-4.8.2-2] it is followed by a non-empty filter.
    if group.is_empty() || group.contains(['+', '#']) || !is_valid_filter(inner) {
        return Some(Err(()));
    }
    Some(Ok((group, inner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_wildcard_rules_of_4_7_1() {
        for good in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "sport/tennis/+",
        ] {
            assert!(is_valid_filter(good), "{good} should be valid");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "#/a",
            "a+",
            "a/b+",
            "+a/b",
            "sport/tennis#",
            "##",
        ] {
            assert!(!is_valid_filter(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn topic_names_reject_wildcards_and_emptiness() {
        assert!(check_topic_name("a/b").is_ok());
        assert!(check_topic_name("/").is_ok());
        assert_eq!(
            check_topic_name("a/+").unwrap_err().reason,
            ReasonCode::TopicNameInvalid
        );
        assert!(check_topic_name("a/#").is_err());
        assert!(check_topic_name("").is_err());
    }

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        assert_eq!(split_shared("a/b"), None);
        assert_eq!(split_shared("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(split_shared("$share/g"), Some(Err(())));
        assert_eq!(split_shared("$share//a"), Some(Err(())));
        assert_eq!(split_shared("$share/g+/a"), Some(Err(())));
        assert_eq!(split_shared("$share/g/"), Some(Err(())));
        assert_eq!(split_shared("$queue/a/#"), Some(Ok(("queue", "a/#"))));
        assert_eq!(split_shared("$queue/"), Some(Err(())));
    }
}
