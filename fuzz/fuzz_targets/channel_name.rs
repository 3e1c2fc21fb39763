//! Fuzz target `channel_name`: client-supplied channel names into `ChannelName::parse` and
//! `Namespaces::resolve`. Never panics; accepts exactly the names the documented rules in
//! `herald-core/src/channel.rs` accept; every accepted name round-trips and resolves to the
//! default namespace, a configured one, or `unknown channel`; the `#` rule admits exactly the
//! listed users and never the anonymous one.
//!
//! Input: the first byte picks the length limit (0 = the default 255), the rest is the name.

#![no_main]

use std::sync::OnceLock;

use herald_core::namespace::NamedNamespace;
use herald_core::{ChannelName, ChannelRules, ErrorCode, NamespaceOptions, Namespaces};
use libfuzzer_sys::fuzz_target;

const PUNCTUATION: &str = "_-.:#,=@/+~$!";
const CONFIGURED: [&str; 3] = ["chat", "inbox", "a"];

fn documented_valid(name: &str, max_length: usize) -> bool {
    let users_ok = match name.rsplit_once('#') {
        None => true,
        Some((_, users)) => users.split(',').all(|u| !u.is_empty()),
    };
    !name.is_empty()
        && name.len() <= max_length
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || PUNCTUATION.contains(c))
        && !name.starts_with(':')
        && users_ok
}

fn namespaces() -> &'static Namespaces {
    static NAMESPACES: OnceLock<Namespaces> = OnceLock::new();
    NAMESPACES.get_or_init(|| {
        let named = CONFIGURED
            .iter()
            .map(|name| NamedNamespace {
                name: (*name).into(),
                options: NamespaceOptions::default(),
            })
            .collect();
        Namespaces::new(NamespaceOptions::default(), named).expect("valid namespaces")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let Ok(name) = std::str::from_utf8(rest) else {
        return;
    };
    let rules = match limit {
        0 => ChannelRules::default(),
        n => ChannelRules {
            max_length: usize::from(n),
        },
    };
    let result = ChannelName::parse(name, &rules);
    assert_eq!(
        result.is_ok(),
        documented_valid(name, rules.max_length),
        "{name:?}"
    );
    let channel = match result {
        Ok(channel) => channel,
        Err(err) => {
            assert_eq!(err.code, ErrorCode::BadRequest);
            return;
        }
    };
    assert_eq!(channel.as_str(), name);
    assert_eq!(channel.to_string(), name);
    assert_eq!(channel.namespace(), name.split_once(':').map(|(ns, _)| ns));
    match channel.allowed_users() {
        None => assert!(channel.user_allowed("") && channel.user_allowed("anyone")),
        Some(users) => {
            let users: Vec<&str> = users.collect();
            assert!(!users.is_empty());
            for user in &users {
                assert!(!user.is_empty() && channel.user_allowed(user));
            }
            assert!(!channel.user_allowed(""));
        }
    }
    match (namespaces().resolve(&channel), channel.namespace()) {
        (Ok(_), None) => {}
        (Ok(_), Some(ns)) if CONFIGURED.contains(&ns) => {}
        (Err(err), Some(ns)) if !CONFIGURED.contains(&ns) => {
            assert_eq!(err.code, ErrorCode::UnknownChannel);
        }
        (result, ns) => panic!("namespace {ns:?} resolved to {result:?}"),
    }
});
