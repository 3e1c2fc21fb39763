//! Bounded, stable-toolchain fuzzing of channel-name parsing (`ChannelName::parse`) and
//! namespace resolution (`Namespaces::resolve`): the parsers every client-supplied channel goes
//! through. The nightly `cargo fuzz` target `channel_name` (see `fuzz/`) checks the same
//! invariants without a case limit.
//!
//! Each property runs a fixed number of cases (2000 by default, `PROPTEST_CASES=N` for more),
//! so the file stays well under ten seconds in a debug build.

use herald_core::namespace::NamedNamespace;
use herald_core::{ChannelName, ChannelRules, ErrorCode, NamespaceOptions, Namespaces};
use proptest::prelude::*;

/// The punctuation `channel.rs` documents as allowed, besides ASCII letters and digits.
const PUNCTUATION: &str = "_-.:#,=@/+~$!";

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn parse(name: &str) -> Result<ChannelName, herald_core::HeraldError> {
    ChannelName::parse(name, &ChannelRules::default())
}

/// The documented rules, written independently of the parser: non-empty, at most
/// `max_length` bytes, only the allowed alphabet, no empty namespace before the first `:`, and
/// when there is a `#`, a non-empty comma-separated list of non-empty user ids after the last.
fn documented_valid(name: &str, max_length: usize) -> bool {
    let alphabet_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || PUNCTUATION.contains(c));
    let users_ok = match name.rsplit_once('#') {
        None => true,
        Some((_, users)) => users.split(',').all(|u| !u.is_empty()),
    };
    !name.is_empty()
        && name.len() <= max_length
        && alphabet_ok
        && !name.starts_with(':')
        && users_ok
}

/// Strings drawn mostly from the channel alphabet (so that many are accepted), with the odd
/// character from outside it.
fn channelish() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(
                "abcXYZ019_-.:#,=@/+~$!".chars().collect::<Vec<_>>()
            ),
            1 => any::<char>(),
            1 => prop::sample::select(vec![' ', '\t', '\n', '\0', '*', '?', '%', '"', 'é']),
        ],
        0..40,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A user id: letters, digits and channel punctuation other than `#` and `,`.
fn user_id() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.=@/+~$!:-]{1,12}"
}

/// A namespace name as `Namespaces::new` accepts it.
fn namespace_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-]{1,10}"
}

proptest! {
    #![proptest_config(config())]

    /// Any string at all: parsing returns, and it accepts exactly what the documented rules
    /// accept; every refusal is a `bad request` (guarantee 6: a machine-readable error).
    #[test]
    fn arbitrary_strings_follow_the_documented_rules(name in any::<String>()) {
        let result = parse(&name);
        prop_assert_eq!(result.is_ok(), documented_valid(&name, 255), "{:?}", name);
        if let Err(err) = result {
            prop_assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    /// The same over strings that are mostly valid, and with a random length limit, so that
    /// the interesting branches (namespaces, `#` lists, the limit) are reached often.
    #[test]
    fn channel_like_strings_follow_the_documented_rules(
        name in channelish(),
        max_length in 0usize..48,
    ) {
        let rules = ChannelRules { max_length };
        let result = ChannelName::parse(&name, &rules);
        prop_assert_eq!(result.is_ok(), documented_valid(&name, max_length), "{:?}", name);
        if let Err(err) = result {
            prop_assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    /// Every accepted name round-trips unchanged (`as_str`, `Display`, `as_arc`), and its
    /// namespace is exactly the text before the first `:`.
    #[test]
    fn accepted_names_round_trip(name in channelish()) {
        if let Ok(channel) = parse(&name) {
            prop_assert_eq!(channel.as_str(), name.as_str());
            prop_assert_eq!(channel.to_string(), name.clone());
            prop_assert_eq!(&**channel.as_arc(), name.as_str());
            let expected_ns = name.split_once(':').map(|(ns, _)| ns);
            prop_assert_eq!(channel.namespace(), expected_ns);
            if let Some(ns) = channel.namespace() {
                prop_assert!(!ns.is_empty());
            }
            // Parsing the accepted text again gives the same channel.
            prop_assert_eq!(parse(channel.as_str()).ok(), Some(channel.clone()));
        }
    }

    /// A name over the limit is refused however valid it is otherwise, and the same name at
    /// exactly the limit is accepted (the limit counts bytes).
    #[test]
    fn names_longer_than_the_limit_are_refused(
        max_length in 1usize..300,
        extra in 1usize..300,
        fill in "[a-zA-Z0-9]",
    ) {
        let rules = ChannelRules { max_length };
        let at_limit = fill.repeat(max_length);
        prop_assert_eq!(
            ChannelName::parse(&at_limit, &rules).map(|c| c.as_str().len()).ok(),
            Some(max_length)
        );
        let over = fill.repeat(max_length + extra);
        let err = ChannelName::parse(&over, &rules).expect_err("over the limit");
        prop_assert_eq!(err.code, ErrorCode::BadRequest);
        prop_assert!(err.detail.contains(&max_length.to_string()), "{}", err.detail);
    }

    /// `ns:prefix#u1,u2,…`: the listed users, and only they, may subscribe; the anonymous
    /// user (empty id) never may; the list is what follows the last `#`.
    #[test]
    fn user_limited_channels_admit_exactly_the_listed_users(
        namespace in proptest::option::of(namespace_name()),
        prefix in "[a-zA-Z0-9_.-]{0,8}(#[a-zA-Z0-9]{1,4})?",
        users in prop::collection::vec(user_id(), 1..6),
        outsider in user_id(),
    ) {
        let name = match &namespace {
            Some(ns) => format!("{ns}:{prefix}#{}", users.join(",")),
            None => format!("{prefix}#{}", users.join(",")),
        };
        let channel = parse(&name).expect("a well-formed user-limited name");
        let allowed: Vec<&str> = channel.allowed_users().expect("user-limited").collect();
        prop_assert_eq!(&allowed, &users.iter().map(String::as_str).collect::<Vec<_>>());
        for user in &users {
            prop_assert!(channel.user_allowed(user), "{} on {}", user, name);
        }
        prop_assert!(!channel.user_allowed(""), "anonymous on {}", name);
        prop_assert_eq!(channel.user_allowed(&outsider), users.contains(&outsider));
        // A user id is never matched by prefix or by the whole list.
        let joined = users.join(",");
        prop_assert_eq!(
            channel.user_allowed(&joined),
            users.len() == 1,
            "the joined list {} on {}", joined, name
        );
    }

    /// A `#` with nothing, or an empty id, after it is refused; a name without `#` is not
    /// user-limited, so everyone (the anonymous user too) passes the `#` rule.
    #[test]
    fn the_user_list_must_be_well_formed(
        base in "[a-zA-Z0-9_.-]{1,10}",
        users in prop::collection::vec("[a-z0-9]{0,3}", 1..5),
        who in "[a-z]{0,5}",
    ) {
        let plain = parse(&base).expect("valid plain name");
        prop_assert!(plain.allowed_users().is_none());
        prop_assert!(plain.user_allowed(&who));
        prop_assert!(plain.user_allowed(""));

        let name = format!("{base}#{}", users.join(","));
        let has_empty = users.iter().any(String::is_empty);
        let result = parse(&name);
        prop_assert_eq!(result.is_err(), has_empty, "{:?}", name);
        if let Err(err) = result {
            prop_assert_eq!(err.code, ErrorCode::BadRequest);
        }
    }

    /// Resolution of any accepted name never panics: no `:` → the default namespace, a
    /// configured namespace → its options, anything else → `unknown channel` (102).
    #[test]
    fn namespaces_resolve_every_accepted_name(
        configured in prop::collection::btree_set(namespace_name(), 0..5),
        name in prop_oneof![
            channelish(),
            (namespace_name(), "[a-z0-9:#,]{1,10}").prop_map(|(ns, rest)| format!("{ns}:{rest}")),
        ],
    ) {
        // Each configured namespace gets a distinct history size, to tell them apart.
        let named: Vec<NamedNamespace> = configured
            .iter()
            .enumerate()
            .map(|(i, ns)| NamedNamespace {
                name: ns.clone(),
                options: NamespaceOptions {
                    history_size: 10 + i as u32,
                    ..NamespaceOptions::default()
                },
            })
            .collect();
        let namespaces = Namespaces::new(NamespaceOptions::default(), named)
            .expect("valid, unique namespace names");
        let Ok(channel) = parse(&name) else {
            return Ok(());
        };
        let resolved = namespaces.resolve(&channel);
        match channel.namespace() {
            None => {
                let options = resolved.expect("the default namespace");
                prop_assert_eq!(&**options, &NamespaceOptions::default());
            }
            Some(ns) => match configured.iter().position(|c| c == ns) {
                Some(i) => {
                    let options = resolved.expect("a configured namespace");
                    prop_assert_eq!(options.history_size, 10 + i as u32);
                }
                None => {
                    let err = resolved.expect_err("an unconfigured namespace");
                    prop_assert_eq!(err.code, ErrorCode::UnknownChannel);
                }
            },
        }
    }
}
