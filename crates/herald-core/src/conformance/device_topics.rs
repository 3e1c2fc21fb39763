//! The topic rules of the device suite: users' topics attached to their devices, a device's
//! own topics, and the device–topic and user–topic listings.
//!
//! Owns: the topic rules [`super::run_device_suite`] runs. Panics with a message naming the
//! broken rule.
//!
//! May touch: only the stores the suite hands it.

use crate::device::{
    DeviceError, DeviceFilter, DeviceStore, DeviceTopic, DeviceTopicFilter, DeviceUpdate,
    PageRequest, Platform, Provider, TopicOp, UserTopic, UserTopicFilter,
};

use super::devices::{T0, every_page, first_page, get, ids_of, new_device, register, topics};

async fn set_user_topics(
    store: &dyn DeviceStore,
    user: &str,
    op: TopicOp,
    names: &[&str],
    rule: &str,
) {
    store
        .update_user_topics(user, op, &topics(names))
        .await
        .unwrap_or_else(|err| panic!("{rule}: update_user_topics failed: {err}"));
}

async fn all_topics_of(store: &dyn DeviceStore, id: &str, rule: &str) -> Vec<String> {
    get(store, id, true, rule)
        .await
        .unwrap_or_else(|| panic!("{rule}: device {id:?} is gone"))
        .topics
}

pub(super) async fn user_topic_rules(store: &dyn DeviceStore) {
    let rule = "user topics: a device has its user's topics, without copying them";
    let d1 = register(
        store,
        new_device(Provider::Fcm, "t1", Platform::Android, "alice", &["a"]),
        T0,
        rule,
    )
    .await;
    set_user_topics(store, "alice", TopicOp::Set, &["y", "x"], rule).await;
    assert_eq!(
        all_topics_of(store, &d1.id, rule).await,
        topics(&["a", "x", "y"]),
        "{rule}"
    );
    assert_eq!(
        get(store, &d1.id, false, rule).await.map(|d| d.topics),
        Some(topics(&["a"])),
        "{rule}: without include_user_topics only the device's own"
    );
    set_user_topics(store, "alice", TopicOp::Add, &["z"], rule).await;
    set_user_topics(store, "alice", TopicOp::Remove, &["x"], rule).await;
    assert_eq!(
        all_topics_of(store, &d1.id, rule).await,
        topics(&["a", "y", "z"]),
        "{rule}: a change of the user's topics shows on the device at once"
    );
    let d2 = register(
        store,
        new_device(Provider::Apns, "t2", Platform::Ios, "alice", &[]),
        T0,
        rule,
    )
    .await;
    assert_eq!(
        all_topics_of(store, &d2.id, rule).await,
        topics(&["y", "z"]),
        "{rule}: a device registered later has its user's topics too"
    );

    let rule = "user topics: attached and detached as the device's user changes";
    set_user_topics(store, "bob", TopicOp::Set, &["b"], rule).await;
    let to_bob = DeviceUpdate {
        user: Some("bob".to_owned()),
        ..DeviceUpdate::default()
    };
    let only_d1 = DeviceFilter {
        ids: vec![d1.id.clone()],
        ..DeviceFilter::default()
    };
    store
        .update(&only_d1, &to_bob, T0 + 1)
        .await
        .unwrap_or_else(|err| panic!("{rule}: update failed: {err}"));
    assert_eq!(
        all_topics_of(store, &d1.id, rule).await,
        topics(&["a", "b"]),
        "{rule}"
    );
    let by_alice_topic = DeviceFilter {
        topics: topics(&["y"]),
        ..DeviceFilter::default()
    };
    assert_eq!(
        ids_of(store, &by_alice_topic, rule).await,
        vec![d2.id.clone()],
        "{rule}: a topic filter no longer matches by the old user's topics"
    );
    let reregistered = register(
        store,
        new_device(Provider::Fcm, "t1", Platform::Android, "", &["a"]),
        T0 + 2,
        rule,
    )
    .await;
    assert_eq!(reregistered.id, d1.id, "{rule}: same token, same device");
    assert_eq!(
        all_topics_of(store, &d1.id, rule).await,
        topics(&["a"]),
        "{rule}: an anonymous device has no user's topics"
    );
    store
        .update(
            &only_d1,
            &DeviceUpdate {
                user: Some("alice".to_owned()),
                ..DeviceUpdate::default()
            },
            T0 + 3,
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: update failed: {err}"));
    assert_eq!(
        all_topics_of(store, &d1.id, rule).await,
        topics(&["a", "y", "z"]),
        "{rule}: back to alice, alice's topics are back"
    );

    let rule = "user topics: an empty user is Invalid";
    let result = store
        .update_user_topics("", TopicOp::Add, &topics(&["t"]))
        .await;
    assert!(
        matches!(result, Err(DeviceError::Invalid(_))),
        "{rule}, got {result:?}"
    );
    assert_eq!(
        all_topics_of(store, &reregistered.id, rule).await,
        topics(&["a", "y", "z"]),
        "{rule}: nothing changed"
    );
}

pub(super) async fn device_topic_rules(store: &dyn DeviceStore) {
    let rule = "update_device_topics: add, remove and set a device's own topics";
    let device = register(
        store,
        new_device(Provider::Fcm, "t1", Platform::Android, "", &["a"]),
        T0,
        rule,
    )
    .await;
    for (i, (op, names, expected)) in [
        (TopicOp::Add, vec!["c", "b", "c"], vec!["a", "b", "c"]),
        (TopicOp::Remove, vec!["b", "nope"], vec!["a", "c"]),
        (TopicOp::Set, vec!["z", "y"], vec!["y", "z"]),
        (TopicOp::Set, vec![], vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let now = T0 + 1 + i as u64;
        store
            .update_device_topics(&device.id, op, &topics(&names), now)
            .await
            .unwrap_or_else(|err| panic!("{rule}: update_device_topics failed: {err}"));
        let stored = get(store, &device.id, false, rule)
            .await
            .expect("device exists");
        assert_eq!(stored.topics, topics(&expected), "{rule}: {op:?} {names:?}");
        assert_eq!(stored.updated_at, now, "{rule}: updated_at is now");
    }
    let result = store
        .update_device_topics("no-such-device", TopicOp::Add, &topics(&["a"]), T0)
        .await;
    assert!(
        matches!(result, Err(DeviceError::NotFound(_))),
        "update_device_topics: an unknown device is NotFound, got {result:?}"
    );
}

/// A listed device–topic pair: device id, topic, whether it comes from the user.
type Pair = (String, String, bool);

async fn pairs(
    store: &dyn DeviceStore,
    filter: &DeviceTopicFilter,
    limit: usize,
    rule: &str,
) -> Vec<Pair> {
    let items = every_page(
        limit,
        |page| async move {
            store
                .device_topics(filter, &page)
                .await
                .unwrap_or_else(|err| panic!("{rule}: device_topics failed: {err}"))
        },
        |p: &DeviceTopic| p.id.clone(),
        rule,
    )
    .await;
    for pair in &items {
        assert_eq!(
            pair.id,
            format!("{}:{}", pair.device.id, pair.topic),
            "{rule}: a pair's id is `<device id>:<topic>`"
        );
    }
    items
        .into_iter()
        .map(|p| (p.device.id, p.topic, p.from_user))
        .collect()
}

pub(super) async fn device_topic_listing_rules(store: &dyn DeviceStore) {
    let rule = "device_topics: own and user's topics, by device id then topic";
    let d1 = register(
        store,
        new_device(
            Provider::Fcm,
            "t1",
            Platform::Android,
            "alice",
            &["news", "sport"],
        ),
        T0,
        rule,
    )
    .await;
    let d2 = register(
        store,
        new_device(Provider::Apns, "t2", Platform::Ios, "bob", &["news", "nba"]),
        T0,
        rule,
    )
    .await;
    register(
        store,
        new_device(Provider::Webpush, "t3", Platform::Web, "carol", &[]),
        T0,
        rule,
    )
    .await;
    set_user_topics(store, "alice", TopicOp::Set, &["alerts", "news"], rule).await;
    let (d1, d2) = (d1.id, d2.id);
    let p = |d: &String, topic: &str, from_user: bool| (d.clone(), topic.to_owned(), from_user);
    let mut everything = vec![
        p(&d1, "alerts", true),
        p(&d1, "news", false),
        p(&d1, "sport", false),
        p(&d2, "nba", false),
        p(&d2, "news", false),
    ];
    everything.sort();
    let all = DeviceTopicFilter::default();
    for limit in [1, 2, 5, 100] {
        assert_eq!(
            pairs(store, &all, limit, rule).await,
            everything,
            "{rule} (a topic both own and the user's is listed once, as own), pages of {limit}"
        );
    }
    let listed = store
        .device_topics(&all, &first_page(100))
        .await
        .unwrap_or_else(|err| panic!("{rule}: device_topics failed: {err}"));
    let alerts = listed.items.iter().find(|p| p.topic == "alerts");
    assert_eq!(
        alerts.map(|p| (p.device.token.as_str(), p.device.user.as_str())),
        Some(("t1", "alice")),
        "{rule}: each pair carries its device"
    );
    let with_total = store
        .device_topics(
            &all,
            &PageRequest {
                include_total: true,
                ..first_page(2)
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: device_topics failed: {err}"));
    assert_eq!(
        (with_total.items.len(), with_total.total),
        (2, Some(5)),
        "device_topics: include_total counts every pair"
    );

    let rule = "device_topics: filters are AND across fields, OR within one";
    let only = |keep: &dyn Fn(&Pair) -> bool| -> Vec<Pair> {
        everything.iter().filter(|x| keep(x)).cloned().collect()
    };
    let cases: Vec<(&str, DeviceTopicFilter, Vec<Pair>)> = vec![
        (
            "device ids",
            DeviceTopicFilter {
                device_ids: vec![d2.clone()],
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.0 == d2),
        ),
        (
            "device users",
            DeviceTopicFilter {
                device_users: vec!["alice".to_owned(), "carol".to_owned()],
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.0 == d1),
        ),
        (
            "providers",
            DeviceTopicFilter {
                device_providers: vec![Provider::Apns],
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.0 == d2),
        ),
        (
            "platforms",
            DeviceTopicFilter {
                device_platforms: vec![Platform::Android, Platform::Web],
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.0 == d1),
        ),
        (
            "topics",
            DeviceTopicFilter {
                topics: topics(&["news", "alerts"]),
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.1 == "news" || x.1 == "alerts"),
        ),
        (
            "topic prefix",
            DeviceTopicFilter {
                topic_prefix: "n".to_owned(),
                ..DeviceTopicFilter::default()
            },
            only(&|x| x.1.starts_with('n')),
        ),
        (
            "prefix and user",
            DeviceTopicFilter {
                device_users: vec!["bob".to_owned()],
                topic_prefix: "ne".to_owned(),
                ..DeviceTopicFilter::default()
            },
            vec![p(&d2, "news", false)],
        ),
        (
            "topics and prefix",
            DeviceTopicFilter {
                topics: topics(&["sport", "nba"]),
                topic_prefix: "s".to_owned(),
                ..DeviceTopicFilter::default()
            },
            vec![p(&d1, "sport", false)],
        ),
    ];
    for (what, filter, expected) in cases {
        assert_eq!(
            pairs(store, &filter, 2, rule).await,
            expected,
            "{rule}: {what}"
        );
    }
}

async fn user_pairs(
    store: &dyn DeviceStore,
    filter: &UserTopicFilter,
    limit: usize,
    rule: &str,
) -> Vec<(String, String)> {
    let items = every_page(
        limit,
        |page| async move {
            store
                .user_topics(filter, &page)
                .await
                .unwrap_or_else(|err| panic!("{rule}: user_topics failed: {err}"))
        },
        |p: &UserTopic| (p.user.clone(), p.topic.clone()),
        rule,
    )
    .await;
    for pair in &items {
        assert_eq!(
            pair.id,
            format!("{}:{}", pair.user, pair.topic),
            "{rule}: a pair's id is `<user>:<topic>`"
        );
    }
    items.into_iter().map(|p| (p.user, p.topic)).collect()
}

pub(super) async fn user_topic_listing_rules(store: &dyn DeviceStore) {
    let rule = "user_topics: every user's topics, by user then topic, with or without devices";
    // `:` in users and topics: cursors must not confuse "a:" + "b" with "a" + ":b".
    set_user_topics(
        store,
        "alice",
        TopicOp::Set,
        &["news", "alerts", "n:x"],
        rule,
    )
    .await;
    set_user_topics(store, "alice:", TopicOp::Set, &["b"], rule).await;
    set_user_topics(store, "alice", TopicOp::Add, &[":b"], rule).await;
    set_user_topics(store, "bob", TopicOp::Set, &["news"], rule).await;
    set_user_topics(store, "carol", TopicOp::Set, &["gone"], rule).await;
    set_user_topics(store, "carol", TopicOp::Remove, &["gone"], rule).await;
    let pair = |u: &str, t: &str| (u.to_owned(), t.to_owned());
    let mut everything = vec![
        pair("alice", ":b"),
        pair("alice", "alerts"),
        pair("alice", "n:x"),
        pair("alice", "news"),
        pair("alice:", "b"),
        pair("bob", "news"),
    ];
    everything.sort();
    let all = UserTopicFilter::default();
    for limit in [1, 2, 4, 100] {
        assert_eq!(
            user_pairs(store, &all, limit, rule).await,
            everything,
            "{rule}, pages of {limit}"
        );
    }
    let with_total = store
        .user_topics(
            &all,
            &PageRequest {
                include_total: true,
                ..first_page(1)
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: user_topics failed: {err}"));
    assert_eq!(
        with_total.total,
        Some(6),
        "user_topics: include_total counts every pair"
    );

    let rule = "user_topics: filters by users, topics and topic prefix";
    let cases = vec![
        (
            "users",
            UserTopicFilter {
                users: vec!["bob".to_owned(), "alice:".to_owned()],
                ..UserTopicFilter::default()
            },
            vec![pair("alice:", "b"), pair("bob", "news")],
        ),
        (
            "topics",
            UserTopicFilter {
                topics: topics(&["news", "b"]),
                ..UserTopicFilter::default()
            },
            vec![
                pair("alice", "news"),
                pair("alice:", "b"),
                pair("bob", "news"),
            ],
        ),
        (
            "prefix",
            UserTopicFilter {
                topic_prefix: "n".to_owned(),
                ..UserTopicFilter::default()
            },
            vec![
                pair("alice", "n:x"),
                pair("alice", "news"),
                pair("bob", "news"),
            ],
        ),
        (
            "user and prefix",
            UserTopicFilter {
                users: vec!["alice".to_owned()],
                topic_prefix: "ne".to_owned(),
                ..UserTopicFilter::default()
            },
            vec![pair("alice", "news")],
        ),
    ];
    for (what, filter, expected) in cases {
        assert_eq!(
            user_pairs(store, &filter, 1, rule).await,
            expected,
            "{rule}: {what}"
        );
    }
}
