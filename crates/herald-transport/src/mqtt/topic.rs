//! MQTT topics ↔ Herald channels, and topic filters with their wildcards.
//!
//! The mapping is one rule: the topic `a/b/c` is the channel `<namespace>:a/b/c`, where the
//! namespace is `[mqtt] namespace` (a configured namespace, so its options — history,
//! presence, who may publish, proxies — apply to every MQTT topic). A topic must be a valid
//! channel name after the prefix: ASCII letters, digits and `_-.=@~$!,:` between the `/`
//! level separators, and not longer than the channel name limit. MQTT's wildcards `+` and
//! `#` are never part of a topic name, so channels of the namespace whose names hold them
//! (user-limited channels such as `mqtt:inbox#alice`) have no topic and are never delivered
//! over MQTT.
//!
//! A filter is a topic with `+` (one whole level) and `#` (the rest, last level only) in it;
//! a filter that starts with a wildcard does not match topics that start with `$` (MQTT
//! 3.1.1 §4.7.2, MQTT 5 §4.7.2).
//!
//! May touch: nothing; pure functions.

/// Characters a topic level may hold besides ASCII letters and digits: the channel
/// alphabet without the MQTT wildcards (`+`, `#`) and the level separator.
const TOPIC_PUNCTUATION: &[u8] = b"_-.=@~$!,:";

/// Why a topic or filter was refused (MQTT 5 reason 0x90 / 0x8F; 3.1.1 closes or fails).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TopicError(pub String);

fn level_char_allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || TOPIC_PUNCTUATION.contains(&byte)
}

fn check_text(text: &str, what: &str) -> Result<(), TopicError> {
    if text.is_empty() {
        return Err(TopicError(format!("the {what} is empty")));
    }
    if let Some(bad) = text
        .bytes()
        .find(|b| *b != b'/' && *b != b'+' && *b != b'#' && !level_char_allowed(*b))
    {
        let shown = if bad.is_ascii_graphic() {
            format!("{:?}", bad as char)
        } else {
            format!("byte 0x{bad:02x}")
        };
        return Err(TopicError(format!(
            "the {what} contains {shown}; Herald topics use ASCII letters, digits, '/' and {}",
            String::from_utf8_lossy(TOPIC_PUNCTUATION)
        )));
    }
    Ok(())
}

/// Maps topics to channels and back for one namespace.
#[derive(Clone, Debug)]
pub struct TopicMap {
    /// `"<namespace>:"`.
    prefix: String,
    /// Longest channel name (`[channels] max_length`).
    max_channel_length: usize,
}

impl TopicMap {
    pub fn new(namespace: &str, max_channel_length: usize) -> Self {
        Self {
            prefix: format!("{namespace}:"),
            max_channel_length,
        }
    }

    /// The channel of a topic name a client publishes to.
    pub fn channel(&self, topic: &str) -> Result<String, TopicError> {
        check_text(topic, "topic name")?;
        if topic.contains(['+', '#']) {
            return Err(TopicError(
                "a topic name may not hold the wildcards '+' or '#'".into(),
            ));
        }
        let channel = format!("{}{topic}", self.prefix);
        if channel.len() > self.max_channel_length {
            return Err(TopicError(format!(
                "the topic is {} bytes long; with the namespace prefix the limit is {}",
                topic.len(),
                self.max_channel_length.saturating_sub(self.prefix.len())
            )));
        }
        Ok(channel)
    }

    /// The topic of a channel, when the channel is in the namespace and its name is a valid
    /// topic name (no `+` or `#`).
    pub fn topic<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let topic = channel.strip_prefix(self.prefix.as_str())?;
        (!topic.is_empty() && !topic.contains(['+', '#'])).then_some(topic)
    }

    /// The namespace prefix, `"<namespace>:"`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The longest channel-name prefix every channel `filter` matches starts with: the
    /// levels before its first wildcard (`a/+/c` → `<namespace>:a/`; `a/#` → `<namespace>:a`,
    /// since `a/#` matches `a` too; `#` → `<namespace>:`). What a node must receive from the
    /// cluster for the filter.
    pub fn channel_prefix(&self, filter: &Filter) -> String {
        let text = filter.as_str();
        let mut end = 0_usize;
        for level in text.split('/') {
            match level {
                "+" => break,
                "#" => {
                    end = end.saturating_sub(1);
                    break;
                }
                _ => end += level.len() + 1,
            }
        }
        let end = end.min(text.len());
        format!("{}{}", self.prefix, &text[..end])
    }
}

/// A topic filter: an exact topic, or one with wildcards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    Exact(String),
    Wildcard(String),
}

impl Filter {
    /// Parses a filter from SUBSCRIBE or UNSUBSCRIBE.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        check_text(text, "topic filter")?;
        let levels: Vec<&str> = text.split('/').collect();
        let last = levels.len() - 1;
        let mut wildcard = false;
        for (index, level) in levels.iter().enumerate() {
            match *level {
                "+" => wildcard = true,
                "#" if index == last => wildcard = true,
                "#" => {
                    return Err(TopicError(
                        "'#' must be the last level of a topic filter".into(),
                    ));
                }
                other if other.contains(['+', '#']) => {
                    return Err(TopicError(
                        "a wildcard must stand alone in its topic level".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(if wildcard {
            Self::Wildcard(text.to_owned())
        } else {
            Self::Exact(text.to_owned())
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Wildcard(text) => text,
        }
    }

    /// Whether the filter matches `topic` (a topic name: no wildcards).
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(text) => text == topic,
            Self::Wildcard(text) => wildcard_matches(text, topic),
        }
    }
}

/// Whether the wildcard filter `filter` matches the topic name `topic`.
pub fn wildcard_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            // `#` also matches the parent level: `a/#` matches `a`.
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> TopicMap {
        TopicMap::new("mqtt", 255)
    }

    #[test]
    fn topics_map_to_channels_of_the_namespace_and_back() {
        let map = map();
        assert_eq!(
            map.channel("sensors/1/temp").expect("valid"),
            "mqtt:sensors/1/temp"
        );
        assert_eq!(map.topic("mqtt:sensors/1/temp"), Some("sensors/1/temp"));
        assert_eq!(map.channel("$SYS/x").expect("valid"), "mqtt:$SYS/x");
        assert_eq!(map.topic("other:sensors"), None, "another namespace");
        assert_eq!(
            map.topic("mqtt:inbox#alice"),
            None,
            "user-limited: no topic"
        );
        assert_eq!(map.topic("mqtt:a+b"), None);
        assert_eq!(map.topic("mqtt:"), None);
        // Empty levels are levels (MQTT allows them).
        assert_eq!(map.channel("/a//b").expect("valid"), "mqtt:/a//b");
    }

    #[test]
    fn a_filters_channel_prefix_is_what_precedes_its_first_wildcard() {
        let map = map();
        for (filter, prefix) in [
            ("a/+/c", "mqtt:a/"),
            ("a/b/#", "mqtt:a/b"),
            ("a/#", "mqtt:a"),
            ("#", "mqtt:"),
            ("+/x", "mqtt:"),
            ("/+", "mqtt:/"),
            ("a/b", "mqtt:a/b"),
        ] {
            let filter = Filter::parse(filter).expect("valid");
            assert_eq!(map.channel_prefix(&filter), prefix, "{filter:?}");
        }
        // Every channel a filter matches starts with its prefix.
        for (filter, topic) in [("a/#", "a"), ("a/+/c", "a/b/c"), ("/+", "/x")] {
            let filter = Filter::parse(filter).expect("valid");
            assert!(filter.matches(topic));
            let channel = map.channel(topic).expect("valid");
            assert!(channel.starts_with(&map.channel_prefix(&filter)));
        }
    }

    #[test]
    fn bad_topic_names_are_refused_with_a_reason() {
        let map = map();
        for bad in ["", "a/+/b", "a/#", "sp ace", "ünï", "tab\t", "a\u{0}b"] {
            let error = map.channel(bad).expect_err(bad);
            assert!(!error.0.is_empty(), "{bad:?}");
        }
        let long = "a".repeat(251);
        assert!(map.channel(&long).is_err(), "mqtt: + 251 > 255");
        assert!(map.channel(&"a".repeat(250)).is_ok());
    }

    #[test]
    fn filters_parse_exact_and_wildcard() {
        assert_eq!(
            Filter::parse("a/b").expect("valid"),
            Filter::Exact("a/b".into())
        );
        assert_eq!(
            Filter::parse("a/+/c").expect("valid"),
            Filter::Wildcard("a/+/c".into())
        );
        assert_eq!(
            Filter::parse("#").expect("valid"),
            Filter::Wildcard("#".into())
        );
        assert_eq!(
            Filter::parse("a/#").expect("valid"),
            Filter::Wildcard("a/#".into())
        );
        for bad in ["", "a/#/b", "a+/b", "a/b#", "#/a", "x y"] {
            assert!(Filter::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_match_like_the_specification_says() {
        let cases = [
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
            ("sport/#", "sport", true),
            ("#", "anything/at/all", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/b", "a/b", true),
            // `$` topics are not matched by a leading wildcard, but are by an explicit level.
            ("#", "$SYS/broker", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(
                wildcard_matches(filter, topic),
                expected,
                "{filter:?} vs {topic:?}"
            );
        }
    }
}
