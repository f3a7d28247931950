//! The ACL file: who may publish to and subscribe to which topics.
//!
//! ```text
//! # Lines before any `user` or `client` line apply to every client, anonymous ones too.
//! default deny                       # what applies when no rule matches (deny unless set)
//! topic read $SYS/#
//! pattern readwrite devices/%c/#     # `pattern` lines apply to every client wherever they are
//! user alice                         # rules for the client authenticated as alice
//! topic readwrite sensors/#
//! topic deny sensors/secret/#
//! client dashboard-1                 # rules for the client with this client identifier
//! topic read sensors/+/temperature
//! ```
//!
//! Access is `read`, `write`, `readwrite` or `deny`; `topic FILTER` alone means `readwrite`.
//! `%u` is the username and `%c` the client identifier; a rule whose placeholder would expand to
//! something holding `/`, `+` or `#` (or a missing username) never applies, so a client cannot
//! widen its own rules by choosing its identifier. A matching `deny` beats any grant.
//! Wildcards follow MQTT matching, `$` rule included: `#` does not grant `$SYS/...`.

use std::collections::HashMap;
use std::path::Path;

use super::FileError;
use crate::protocol::topic::{filter_covers, filter_matches};
use crate::protocol::validate::is_valid_filter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "readwrite" => Some(Self::ReadWrite),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }

    fn grants(self, wanted: Access) -> bool {
        matches!(
            (self, wanted),
            (Self::ReadWrite, Self::Read | Self::Write)
                | (Self::Read, Self::Read)
                | (Self::Write, Self::Write)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    access: Access,
    /// May hold `%u` and `%c`.
    filter: String,
}

/// The parsed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    everyone: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    clients: HashMap<String, Vec<Rule>>,
    default: Access,
}

enum Section {
    Everyone,
    User(String),
    Client(String),
}

impl Acl {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        super::load_file(path, Self::parse)
    }

    /// Parses the file's text; an error names the 1-based line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut acl = Acl {
            everyone: Vec::new(),
            users: HashMap::new(),
            clients: HashMap::new(),
            default: Access::Deny,
        };
        let mut section = Section::Everyone;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let mut words: Vec<&str> = Vec::new();
            for word in line.split_whitespace() {
                // A word starting with `#` begins a comment, unless it is the filter `#`.
                if word.starts_with('#') && !(word == "#" && is_filter_position(&words)) {
                    break;
                }
                words.push(word);
            }
            let Some((&keyword, args)) = words.split_first() else {
                continue;
            };
            match (keyword, args) {
                ("user", [name]) => section = Section::User((*name).to_owned()),
                ("client", [id]) => section = Section::Client((*id).to_owned()),
                ("default", [access]) => {
                    acl.default = Access::parse(access)
                        .ok_or((number, format!("unknown access {access:?}")))?;
                }
                ("topic" | "pattern", [..]) => {
                    let (access, filter) = match args {
                        [filter] => (Access::ReadWrite, *filter),
                        [access, filter] => (
                            Access::parse(access)
                                .ok_or((number, format!("unknown access {access:?}")))?,
                            *filter,
                        ),
                        _ => return Err((number, format!("expected {keyword} [ACCESS] FILTER"))),
                    };
                    let probe = filter.replace("%u", "u").replace("%c", "c");
                    if !is_valid_filter(&probe) {
                        return Err((number, format!("{filter:?} is not a valid topic filter")));
                    }
                    let rule = Rule {
                        access,
                        filter: filter.to_owned(),
                    };
                    match (&section, keyword) {
                        (_, "pattern") | (Section::Everyone, _) => acl.everyone.push(rule),
                        (Section::User(name), _) => {
                            acl.users.entry(name.clone()).or_default().push(rule)
                        }
                        (Section::Client(id), _) => {
                            acl.clients.entry(id.clone()).or_default().push(rule)
                        }
                    }
                }
                _ => return Err((number, format!("cannot read {line:?}"))),
            }
        }
        Ok(acl)
    }

    /// The rules that apply to one connected client, placeholders expanded.
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let own = username
            .and_then(|user| self.users.get(user))
            .into_iter()
            .chain(self.clients.get(client_id))
            .flatten();
        let rules = self
            .everyone
            .iter()
            .chain(own)
            .filter_map(|rule| {
                expand(&rule.filter, username, client_id).map(|filter| (rule.access, filter))
            })
            .collect();
        ClientAcl {
            rules,
            default: self.default,
        }
    }
}

/// Whether the words so far are `topic|pattern [ACCESS]`, so that a `#` next is a filter.
fn is_filter_position(words: &[&str]) -> bool {
    matches!(words, ["topic" | "pattern"])
        || matches!(words, ["topic" | "pattern", access] if Access::parse(access).is_some())
}

fn expand(filter: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let safe = |value: &str| !value.is_empty() && !value.contains(['/', '+', '#']);
    let mut expanded = filter.to_owned();
    if filter.contains("%u") {
        let user = username.filter(|user| safe(user))?;
        expanded = expanded.replace("%u", user);
    }
    if filter.contains("%c") {
        if !safe(client_id) {
            return None;
        }
        expanded = expanded.replace("%c", client_id);
    }
    Some(expanded)
}

/// One client's rules.
#[derive(Clone, Debug)]
pub struct ClientAcl {
    rules: Vec<(Access, String)>,
    default: Access,
}

impl ClientAcl {
    pub fn may_publish(&self, topic: &str) -> bool {
        self.decide(Access::Write, |filter| filter_matches(filter, topic))
    }

    /// Whether a message on `topic` may be delivered to this client.
    pub fn may_read(&self, topic: &str) -> bool {
        self.decide(Access::Read, |filter| filter_matches(filter, topic))
    }

    /// Whether this client may subscribe to `filter`: a read rule must cover all of it, and no
    /// deny rule may. A deny rule covering only part of it is enforced per message instead.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.decide(Access::Read, |rule| filter_covers(rule, filter))
    }

    fn decide(&self, wanted: Access, applies: impl Fn(&str) -> bool) -> bool {
        let mut granted = false;
        for (access, filter) in &self.rules {
            if (*access == Access::Deny || (!granted && access.grants(wanted))) && applies(filter) {
                if *access == Access::Deny {
                    return false;
                }
                granted = true;
            }
        }
        granted || self.default.grants(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "\
# comment
default deny
topic read $SYS/#
pattern readwrite devices/%c/#
pattern read users/%u/#
user alice
topic readwrite sensors/#   # trailing comment
topic deny sensors/secret/#
client dash
topic read sensors/+/temp
";

    #[test]
    fn user_client_and_pattern_rules_apply() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.for_client(Some("alice"), "phone");
        assert!(alice.may_publish("sensors/a/temp"));
        assert!(alice.may_subscribe("sensors/#"));
        assert!(!alice.may_read("sensors/secret/key"));
        assert!(!alice.may_subscribe("sensors/secret/#"));
        assert!(alice.may_publish("devices/phone/status"));
        assert!(!alice.may_publish("devices/other/status"));
        assert!(alice.may_read("users/alice/inbox"));
        assert!(!alice.may_publish("users/alice/inbox"));
        assert!(alice.may_read("$SYS/broker/uptime"));
        assert!(!alice.may_publish("$SYS/broker/uptime"));

        let dash = acl.for_client(None, "dash");
        assert!(dash.may_subscribe("sensors/+/temp"));
        assert!(dash.may_subscribe("sensors/kitchen/temp"));
        assert!(!dash.may_subscribe("sensors/#"));
        assert!(!dash.may_publish("sensors/kitchen/temp"));
        // Anonymous: %u rules never apply.
        assert!(!dash.may_read("users//inbox"));
    }

    #[test]
    fn placeholders_cannot_be_widened_by_the_client() {
        let acl = Acl::parse("pattern readwrite devices/%c/#\n").unwrap();
        assert!(!acl.for_client(None, "#").may_publish("devices/x/y"));
        assert!(!acl.for_client(None, "a/b").may_publish("devices/a/b/c"));
        assert!(acl.for_client(None, "a").may_publish("devices/a/c"));
    }

    #[test]
    fn the_default_rule_applies_when_nothing_matches() {
        let open = Acl::parse("default readwrite\ntopic deny private/#\n").unwrap();
        let client = open.for_client(None, "c");
        assert!(client.may_publish("anything"));
        assert!(!client.may_publish("private/x"));
        // `#` wildcards never reach `$` topics, and neither does a default.
        let closed = Acl::parse("topic readwrite #\n").unwrap();
        assert!(!closed.for_client(None, "c").may_read("$SYS/x"));
        assert!(closed.for_client(None, "c").may_read("x"));
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        assert_eq!(Acl::parse("topic read a\ntopic fly b\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("topic read a/#/b\n").unwrap_err().0, 1);
        assert_eq!(Acl::parse("usr alice\n").unwrap_err().0, 1);
        assert!(Acl::parse("topic #\n").is_ok());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$s".to_string()),
            Just("+".to_string()),
            Just("#".to_string()),
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..4)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("valid", |f| is_valid_filter(f))
    }

    fn topics() -> Vec<String> {
        let mut all = vec![];
        for depth in 1..=4 {
            let mut current = vec![String::new()];
            for _ in 0..depth {
                current = current
                    .iter()
                    .flat_map(|prefix| {
                        ["a", "b", "$s", "c"].iter().map(move |l| {
                            if prefix.is_empty() {
                                l.to_string()
                            } else {
                                format!("{prefix}/{l}")
                            }
                        })
                    })
                    .collect();
            }
            all.extend(current);
        }
        all
    }

    proptest! {
        /// A naive model: `outer` covers `inner` exactly when every topic (over a small
        /// alphabet, deep enough to see `#`) that `inner` matches is matched by `outer`.
        #[test]
        fn covers_agrees_with_matching_every_topic(outer in filter(), inner in filter()) {
            let model = topics()
                .iter()
                .filter(|t| filter_matches(&inner, t))
                .all(|t| filter_matches(&outer, t));
            // With a finite alphabet the model cannot see that `+` also stands for unseen
            // levels; it only ever claims too much coverage, never too little.
            if filter_covers(&outer, &inner) {
                prop_assert!(model, "{outer} claimed to cover {inner}");
            }
            if model && !inner.contains(['+', '#']) {
                prop_assert!(filter_covers(&outer, &inner));
            }
        }
    }
}
