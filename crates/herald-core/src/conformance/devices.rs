//! The device suite: the rules every [`DeviceStore`] backend keeps (the contract in
//! [`crate::device`]).
//!
//! Owns: [`run_device_suite`] and the registration, filter, paging and update rules; the
//! removal rules are in `device_removals.rs`, the topic rules in `device_topics.rs`. Backends call the suite with a factory that
//! builds a fresh, empty store. Times are explicit (`now` arguments), so no rule sleeps or
//! depends on the clock. Panics with a message naming the broken rule.
//!
//! May touch: only the stores the factory builds.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use crate::device::{
    Device, DeviceError, DeviceFilter, DeviceRegistration, DeviceStore, DeviceUpdate, Page,
    PageRequest, Platform, Provider, TopicOp,
};

use super::{device_removals, device_topics};

/// A start time far from zero, so `now - x` never underflows in the rules.
pub(super) const T0: u64 = 1_700_000_000_000;

pub(super) fn topics(names: &[&str]) -> Vec<String> {
    names.iter().map(|t| (*t).to_owned()).collect()
}

/// A new device's registration.
pub(super) fn new_device(
    provider: Provider,
    token: &str,
    platform: Platform,
    user: &str,
    own: &[&str],
) -> DeviceRegistration {
    DeviceRegistration {
        id: None,
        provider: Some(provider),
        token: token.to_owned(),
        platform: Some(platform),
        user: user.to_owned(),
        topics: topics(own),
        ..DeviceRegistration::default()
    }
}

pub(super) async fn register(
    store: &dyn DeviceStore,
    registration: DeviceRegistration,
    now: u64,
    rule: &str,
) -> Device {
    store
        .register(registration, now)
        .await
        .unwrap_or_else(|err| panic!("{rule}: register failed: {err}"))
}

pub(super) fn first_page(limit: usize) -> PageRequest {
    PageRequest {
        cursor: String::new(),
        limit,
        include_total: false,
    }
}

/// Every page of a listing, `limit` items at a time, checking the paging rules on the way:
/// no page is larger than `limit`, only the last has an empty `next_cursor`, no item comes
/// twice. Returns the items in listing order.
pub(super) async fn every_page<T, K, Fut>(
    limit: usize,
    mut fetch: impl FnMut(PageRequest) -> Fut,
    key: impl Fn(&T) -> K,
    rule: &str,
) -> Vec<T>
where
    K: Ord + std::fmt::Debug,
    Fut: Future<Output = Page<T>>,
{
    let mut items: Vec<T> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut cursor = String::new();
    for _ in 0..10_000 {
        let page = fetch(PageRequest {
            cursor: cursor.clone(),
            limit,
            include_total: false,
        })
        .await;
        assert!(
            page.items.len() <= limit,
            "{rule}: a page holds at most the limit ({limit}), got {}",
            page.items.len()
        );
        for item in page.items {
            let k = key(&item);
            assert!(
                !seen.contains(&k),
                "{rule}: item {k:?} was listed twice across pages"
            );
            seen.insert(k);
            items.push(item);
        }
        if page.next_cursor.is_empty() {
            return items;
        }
        assert!(
            seen.len() == items.len() && !items.is_empty(),
            "{rule}: a page with a next cursor must hold items"
        );
        cursor = page.next_cursor;
    }
    panic!("{rule}: paging did not end after 10,000 pages");
}

/// Every device matching `filter`, by paging through [`DeviceStore::list`].
pub(super) async fn list_all(
    store: &dyn DeviceStore,
    filter: &DeviceFilter,
    include_user_topics: bool,
    rule: &str,
) -> Vec<Device> {
    let devices = every_page(
        7,
        |page| async move {
            store
                .list(filter, include_user_topics, &page)
                .await
                .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"))
        },
        |d: &Device| d.id.clone(),
        rule,
    )
    .await;
    let ids: Vec<&String> = devices.iter().map(|d| &d.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{rule}: devices are listed by id, got {ids:?}"
    );
    devices
}

pub(super) async fn ids_of(
    store: &dyn DeviceStore,
    filter: &DeviceFilter,
    rule: &str,
) -> Vec<String> {
    list_all(store, filter, false, rule)
        .await
        .into_iter()
        .map(|d| d.id)
        .collect()
}

/// The device `id` as listed (with its user's topics when `with_user_topics`).
pub(super) async fn get(
    store: &dyn DeviceStore,
    id: &str,
    with_user_topics: bool,
    rule: &str,
) -> Option<Device> {
    let filter = DeviceFilter {
        ids: vec![id.to_owned()],
        ..DeviceFilter::default()
    };
    let mut found = list_all(store, &filter, with_user_topics, rule).await;
    assert!(found.len() <= 1, "{rule}: two devices with id {id:?}");
    found.pop()
}

pub(super) fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Runs every rule against fresh stores from `factory`.
pub async fn run_device_suite<S, F, Fut>(factory: F)
where
    S: DeviceStore,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, DeviceError>>,
{
    let fresh = || async {
        factory()
            .await
            .unwrap_or_else(|err| panic!("the factory must build a store: {err}"))
    };
    registration_rules(&fresh().await).await;
    token_rules(&fresh().await).await;
    filter_rules(&fresh().await).await;
    paging_rules(&fresh().await).await;
    update_rules(&fresh().await).await;
    device_removals::removal_rules(&fresh().await).await;
    device_topics::user_topic_rules(&fresh().await).await;
    device_topics::device_topic_rules(&fresh().await).await;
    device_topics::device_topic_listing_rules(&fresh().await).await;
    device_topics::user_topic_listing_rules(&fresh().await).await;
}

async fn registration_rules(store: &dyn DeviceStore) {
    let rule = "register: a new device is stored as registered, with a new id";
    let mut meta = BTreeMap::new();
    meta.insert("model".to_owned(), "pixel".to_owned());
    let registration = DeviceRegistration {
        app: "app2".to_owned(),
        timezone: "Europe/Berlin".to_owned(),
        locale: "de".to_owned(),
        meta: meta.clone(),
        topics: topics(&["b", "a", "b"]),
        ..new_device(Provider::Fcm, "tok-1", Platform::Android, "alice", &[])
    };
    let device = register(store, registration, T0, rule).await;
    assert!(!device.id.is_empty(), "{rule}: the id is empty");
    let expected = Device {
        id: device.id.clone(),
        provider: Provider::Fcm,
        token: "tok-1".to_owned(),
        platform: Platform::Android,
        user: "alice".to_owned(),
        app: "app2".to_owned(),
        timezone: "Europe/Berlin".to_owned(),
        locale: "de".to_owned(),
        topics: topics(&["a", "b"]),
        meta,
        created_at: T0,
        updated_at: T0,
    };
    assert_eq!(
        device, expected,
        "{rule} (topics sorted and deduplicated, both times set to now)"
    );
    assert_eq!(
        get(store, &device.id, false, rule).await.as_ref(),
        Some(&expected),
        "{rule}: the listed device differs from the one register returned"
    );
    let other = register(
        store,
        new_device(Provider::Fcm, "tok-2", Platform::Android, "alice", &[]),
        T0,
        rule,
    )
    .await;
    assert_ne!(other.id, device.id, "{rule}: two devices got the same id");

    let rule = "register: a new device needs a provider, a token and a platform";
    for (what, registration) in [
        (
            "provider",
            DeviceRegistration {
                provider: None,
                ..new_device(Provider::Fcm, "tok-3", Platform::Android, "", &[])
            },
        ),
        (
            "token",
            new_device(Provider::Fcm, "", Platform::Android, "", &[]),
        ),
        (
            "platform",
            DeviceRegistration {
                platform: None,
                ..new_device(Provider::Fcm, "tok-3", Platform::Android, "", &[])
            },
        ),
    ] {
        let result = store.register(registration, T0).await;
        assert!(
            matches!(result, Err(DeviceError::Invalid(_))),
            "{rule}: without a {what} expected Invalid, got {result:?}"
        );
    }
    assert_eq!(
        ids_of(store, &DeviceFilter::default(), rule).await.len(),
        2,
        "{rule}: a rejected registration must store nothing"
    );

    let rule = "register: registering with an unknown id is NotFound";
    let result = store
        .register(
            DeviceRegistration {
                id: Some("no-such-device".to_owned()),
                ..new_device(Provider::Fcm, "tok-4", Platform::Android, "", &[])
            },
            T0,
        )
        .await;
    assert!(
        matches!(result, Err(DeviceError::NotFound(_))),
        "{rule}, got {result:?}"
    );
}

async fn token_rules(store: &dyn DeviceStore) {
    let rule = "one device per (provider, token): registering a known token updates that device";
    let first = register(
        store,
        new_device(Provider::Apns, "tok", Platform::Ios, "alice", &["a"]),
        T0,
        rule,
    )
    .await;
    let again = register(
        store,
        DeviceRegistration {
            locale: "fr".to_owned(),
            ..new_device(Provider::Apns, "tok", Platform::Ios, "bob", &["b"])
        },
        T0 + 10,
        rule,
    )
    .await;
    assert_eq!(again.id, first.id, "{rule}: the id must be kept");
    assert_eq!(
        (
            again.user.as_str(),
            again.locale.as_str(),
            again.topics.clone()
        ),
        ("bob", "fr", topics(&["b"])),
        "{rule}: the registration's fields replace the old ones"
    );
    assert_eq!(
        (again.created_at, again.updated_at),
        (T0, T0 + 10),
        "{rule}: created_at is kept, updated_at is now"
    );
    assert_eq!(
        ids_of(store, &DeviceFilter::default(), rule).await,
        vec![first.id.clone()],
        "{rule}: a second device was added"
    );
    let fcm = register(
        store,
        new_device(Provider::Fcm, "tok", Platform::Android, "bob", &[]),
        T0,
        rule,
    )
    .await;
    assert_ne!(
        fcm.id, first.id,
        "{rule}: the same token at another provider is another device"
    );

    let rule = "register with an id updates that device, keeping what the registration leaves out";
    let moved = register(
        store,
        DeviceRegistration {
            id: Some(first.id.clone()),
            provider: None,
            platform: None,
            ..new_device(Provider::Apns, "tok-new", Platform::Ios, "carol", &[])
        },
        T0 + 20,
        rule,
    )
    .await;
    assert_eq!(
        (moved.id.as_str(), moved.provider, moved.platform),
        (first.id.as_str(), Provider::Apns, Platform::Ios),
        "{rule}"
    );
    assert_eq!(
        (moved.token.as_str(), moved.user.as_str(), moved.updated_at),
        ("tok-new", "carol", T0 + 20),
        "{rule}"
    );
    let kept = register(
        store,
        DeviceRegistration {
            id: Some(first.id.clone()),
            token: String::new(),
            ..new_device(Provider::Apns, "", Platform::Ios, "carol", &[])
        },
        T0 + 30,
        rule,
    )
    .await;
    assert_eq!(
        kept.token, "tok-new",
        "{rule}: an empty token keeps the token"
    );
    let reused = register(
        store,
        new_device(Provider::Apns, "tok", Platform::Ios, "dave", &[]),
        T0 + 40,
        rule,
    )
    .await;
    assert_ne!(
        reused.id, first.id,
        "{rule}: the device's old token is free after it moved, so it makes a new device"
    );

    let rule = "one device per (provider, token): a device cannot move onto another's token";
    let result = store
        .register(
            DeviceRegistration {
                id: Some(reused.id.clone()),
                ..new_device(Provider::Apns, "tok-new", Platform::Ios, "dave", &[])
            },
            T0 + 50,
        )
        .await;
    assert!(
        matches!(result, Err(DeviceError::Invalid(_))),
        "{rule}: expected Invalid, got {result:?}"
    );
    let holders: Vec<Device> = list_all(store, &DeviceFilter::default(), false, rule)
        .await
        .into_iter()
        .filter(|d| d.provider == Provider::Apns && d.token == "tok-new")
        .collect();
    assert_eq!(
        holders.iter().map(|d| &d.id).collect::<Vec<_>>(),
        vec![&first.id],
        "{rule}: the token must stay with its device"
    );
    assert_eq!(
        get(store, &reused.id, false, rule).await.map(|d| d.token),
        Some("tok".to_owned()),
        "{rule}: the rejected registration must change nothing"
    );
}

/// Four devices and a user topic, for the filter rules: returns their ids.
pub(super) async fn four_devices(store: &dyn DeviceStore, rule: &str) -> [String; 4] {
    let d1 = register(
        store,
        new_device(Provider::Fcm, "t1", Platform::Android, "alice", &["a"]),
        T0,
        rule,
    )
    .await;
    let d2 = register(
        store,
        new_device(Provider::Apns, "t2", Platform::Ios, "alice", &["b"]),
        T0,
        rule,
    )
    .await;
    let d3 = register(
        store,
        new_device(Provider::Webpush, "t3", Platform::Web, "bob", &["a", "c"]),
        T0,
        rule,
    )
    .await;
    let d4 = register(
        store,
        new_device(Provider::Email, "t4", Platform::Other, "", &[]),
        T0,
        rule,
    )
    .await;
    store
        .update_user_topics("bob", TopicOp::Set, &topics(&["u"]))
        .await
        .unwrap_or_else(|err| panic!("{rule}: update_user_topics failed: {err}"));
    [d1.id, d2.id, d3.id, d4.id]
}

async fn filter_rules(store: &dyn DeviceStore) {
    let rule = "filters: AND across fields, OR within one, an empty field does not filter";
    let [d1, d2, d3, d4] = four_devices(store, rule).await;
    let s = |v: &[&String]| sorted(v.iter().map(|s| (*s).clone()).collect());
    let cases: Vec<(&str, DeviceFilter, Vec<String>)> = vec![
        (
            "no filter",
            DeviceFilter::default(),
            s(&[&d1, &d2, &d3, &d4]),
        ),
        (
            "ids",
            DeviceFilter {
                ids: vec![d1.clone(), d3.clone(), "unknown".to_owned()],
                ..DeviceFilter::default()
            },
            s(&[&d1, &d3]),
        ),
        (
            "one user",
            DeviceFilter {
                users: vec!["alice".to_owned()],
                ..DeviceFilter::default()
            },
            s(&[&d1, &d2]),
        ),
        (
            "two users",
            DeviceFilter {
                users: vec!["alice".to_owned(), "bob".to_owned()],
                ..DeviceFilter::default()
            },
            s(&[&d1, &d2, &d3]),
        ),
        (
            "providers",
            DeviceFilter {
                providers: vec![Provider::Fcm, Provider::Webpush],
                ..DeviceFilter::default()
            },
            s(&[&d1, &d3]),
        ),
        (
            "platforms",
            DeviceFilter {
                platforms: vec![Platform::Ios, Platform::Other],
                ..DeviceFilter::default()
            },
            s(&[&d2, &d4]),
        ),
        (
            "an own topic",
            DeviceFilter {
                topics: topics(&["a"]),
                ..DeviceFilter::default()
            },
            s(&[&d1, &d3]),
        ),
        (
            "a user's topic",
            DeviceFilter {
                topics: topics(&["u"]),
                ..DeviceFilter::default()
            },
            s(&[&d3]),
        ),
        (
            "topics own or the user's",
            DeviceFilter {
                topics: topics(&["b", "u"]),
                ..DeviceFilter::default()
            },
            s(&[&d2, &d3]),
        ),
        (
            "user and topic",
            DeviceFilter {
                users: vec!["alice".to_owned()],
                topics: topics(&["a"]),
                ..DeviceFilter::default()
            },
            s(&[&d1]),
        ),
        (
            "provider and user, no match",
            DeviceFilter {
                users: vec!["bob".to_owned()],
                providers: vec![Provider::Apns],
                ..DeviceFilter::default()
            },
            vec![],
        ),
        (
            "every field",
            DeviceFilter {
                ids: vec![d1.clone(), d2.clone(), d3.clone()],
                users: vec!["alice".to_owned(), "bob".to_owned()],
                topics: topics(&["a", "u"]),
                providers: vec![Provider::Fcm, Provider::Webpush, Provider::Apns],
                platforms: vec![Platform::Web, Platform::Ios],
            },
            s(&[&d3]),
        ),
        (
            "an unknown topic",
            DeviceFilter {
                topics: topics(&["zzz"]),
                ..DeviceFilter::default()
            },
            vec![],
        ),
    ];
    for (what, filter, expected) in cases {
        let found = ids_of(store, &filter, rule).await;
        assert_eq!(found, expected, "{rule}: filter by {what}");
    }

    let rule = "list: a device's topics are its own, plus its user's with include_user_topics";
    let own = get(store, &d3, false, rule).await.map(|d| d.topics);
    assert_eq!(own, Some(topics(&["a", "c"])), "{rule}");
    let with_user = get(store, &d3, true, rule).await.map(|d| d.topics);
    assert_eq!(with_user, Some(topics(&["a", "c", "u"])), "{rule}");
}

async fn paging_rules(store: &dyn DeviceStore) {
    let rule = "list: pages by cursor, no device twice, none missed, next_cursor empty at the end";
    let mut registered = Vec::new();
    for i in 0..24 {
        let user = if i % 3 == 0 { "odd" } else { "even" };
        let token = format!("tok-{i:02}");
        let device = register(
            store,
            new_device(Provider::Fcm, &token, Platform::Android, user, &[]),
            T0,
            rule,
        )
        .await;
        registered.push(device.id);
    }
    registered.sort();
    for limit in [1, 5, 8, 24, 25, 1000] {
        let listed = every_page(
            limit,
            |page| async move {
                store
                    .list(&DeviceFilter::default(), false, &page)
                    .await
                    .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"))
            },
            |d: &Device| d.id.clone(),
            rule,
        )
        .await;
        let ids: Vec<String> = listed.into_iter().map(|d| d.id).collect();
        assert_eq!(ids, registered, "{rule}: pages of {limit} in id order");
    }

    let rule = "list: a limit of 0 means the default page";
    let page = store
        .list(&DeviceFilter::default(), false, &first_page(0))
        .await
        .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"));
    assert_eq!(page.items.len(), 24, "{rule}");
    assert!(page.next_cursor.is_empty(), "{rule}: there is no next page");

    let rule = "list: include_total counts every match, whatever the page";
    let odd = DeviceFilter {
        users: vec!["odd".to_owned()],
        ..DeviceFilter::default()
    };
    let mut request = PageRequest {
        include_total: true,
        ..first_page(3)
    };
    let first = store
        .list(&odd, false, &request)
        .await
        .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"));
    assert_eq!((first.items.len(), first.total), (3, Some(8)), "{rule}");
    request.cursor = first.next_cursor;
    let second = store
        .list(&odd, false, &request)
        .await
        .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"));
    assert_eq!(second.total, Some(8), "{rule}: on a later page too");
    let without = store
        .list(&odd, false, &first_page(3))
        .await
        .unwrap_or_else(|err| panic!("{rule}: list failed: {err}"));
    assert_eq!(without.total, None, "{rule}: no total unless asked");
}

async fn update_rules(store: &dyn DeviceStore) {
    let rule = "update: changes every matching device, leaves None fields alone";
    let [d1, d2, d3, d4] = four_devices(store, rule).await;
    let alice = DeviceFilter {
        users: vec!["alice".to_owned()],
        ..DeviceFilter::default()
    };
    let mut meta = BTreeMap::new();
    meta.insert("k".to_owned(), "v".to_owned());
    let update = DeviceUpdate {
        timezone: Some("Asia/Tokyo".to_owned()),
        meta: Some(meta.clone()),
        topics: Some((TopicOp::Add, topics(&["z"]))),
        ..DeviceUpdate::default()
    };
    let changed = store
        .update(&alice, &update, T0 + 5)
        .await
        .unwrap_or_else(|err| panic!("{rule}: update failed: {err}"));
    assert_eq!(changed, 2, "{rule}: it returns how many devices matched");
    for (id, own) in [(&d1, ["a", "z"]), (&d2, ["b", "z"])] {
        let device = get(store, id, false, rule).await.expect("device exists");
        assert_eq!(
            (
                device.timezone.as_str(),
                &device.meta,
                device.topics.clone()
            ),
            ("Asia/Tokyo", &meta, topics(&own)),
            "{rule}"
        );
        assert_eq!(
            (
                device.user.as_str(),
                device.locale.as_str(),
                device.updated_at
            ),
            ("alice", "", T0 + 5),
            "{rule}: user and locale were not in the update; updated_at is now"
        );
    }
    for id in [&d3, &d4] {
        let device = get(store, id, false, rule).await.expect("device exists");
        assert_eq!(
            device.updated_at, T0,
            "{rule}: a device that did not match changed"
        );
    }

    let rule = "update: topic ops add, remove and set a device's own topics";
    let only_d3 = DeviceFilter {
        ids: vec![d3.clone()],
        ..DeviceFilter::default()
    };
    for (op, names, expected) in [
        (TopicOp::Add, vec!["b", "a"], vec!["a", "b", "c"]),
        (TopicOp::Remove, vec!["a", "x"], vec!["b", "c"]),
        (TopicOp::Set, vec!["y", "x", "y"], vec!["x", "y"]),
    ] {
        let update = DeviceUpdate {
            topics: Some((op, topics(&names))),
            ..DeviceUpdate::default()
        };
        store
            .update(&only_d3, &update, T0 + 6)
            .await
            .unwrap_or_else(|err| panic!("{rule}: update failed: {err}"));
        let device = get(store, &d3, false, rule).await.expect("device exists");
        assert_eq!(device.topics, topics(&expected), "{rule}: {op:?} {names:?}");
    }

    let rule = "update: an empty filter is Invalid";
    let result = store.update(&DeviceFilter::default(), &update, T0).await;
    assert!(
        matches!(result, Err(DeviceError::Invalid(_))),
        "{rule}, got {result:?}"
    );
    let rule = "update: a filter matching nothing changes nothing";
    let nobody = DeviceFilter {
        users: vec!["nobody".to_owned()],
        ..DeviceFilter::default()
    };
    let changed = store
        .update(&nobody, &update, T0)
        .await
        .unwrap_or_else(|err| panic!("{rule}: update failed: {err}"));
    assert_eq!(changed, 0, "{rule}");
}
