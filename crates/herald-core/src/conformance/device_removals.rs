//! The removal rules of the device suite: remove by filter, token hygiene (`remove_token`),
//! prune, and the record of removals.
//!
//! Owns: the removal rules [`super::run_device_suite`] runs. Panics with a message naming the
//! broken rule.
//!
//! May touch: only the stores the suite hands it.

use crate::device::{
    DeviceError, DeviceFilter, DeviceRemoval, DeviceStore, PageRequest, Platform, Provider,
};

use super::devices::{
    T0, every_page, first_page, four_devices, get, ids_of, new_device, register, sorted, topics,
};

pub(super) async fn removal_rules(store: &dyn DeviceStore) {
    let rule = "remove: removes the matching devices, returns them and records why";
    let [d1, d2, d3, d4] = four_devices(store, rule).await;
    let alice = DeviceFilter {
        users: vec!["alice".to_owned()],
        ..DeviceFilter::default()
    };
    let removed = store
        .remove(&alice, "api", T0 + 1)
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove failed: {err}"));
    let removed_ids = sorted(removed.iter().map(|d| d.id.clone()).collect());
    assert_eq!(removed_ids, sorted(vec![d1.clone(), d2.clone()]), "{rule}");
    assert!(
        removed
            .iter()
            .any(|d| d.token == "t1" && d.topics == topics(&["a"])),
        "{rule}: the removed devices are returned as they were"
    );
    assert_eq!(
        ids_of(store, &DeviceFilter::default(), rule).await,
        sorted(vec![d3.clone(), d4.clone()]),
        "{rule}"
    );
    let result = store.remove(&DeviceFilter::default(), "api", T0).await;
    assert!(
        matches!(result, Err(DeviceError::Invalid(_))),
        "remove: an empty filter is Invalid, got {result:?}"
    );
    let again = register(
        store,
        new_device(Provider::Fcm, "t1", Platform::Android, "alice", &[]),
        T0 + 2,
        rule,
    )
    .await;
    assert!(
        again.id != d1 && again.created_at == T0 + 2,
        "remove: a removed device's token registers a new device"
    );

    let rule =
        "remove_token: removes the token's device unless it was updated after the given time";
    let kept = store
        .remove_token(
            Provider::Webpush,
            "t3",
            "Unregistered",
            Some(T0 - 1),
            T0 + 3,
        )
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove_token failed: {err}"));
    assert_eq!(
        kept, None,
        "{rule}: the device was updated after the token died"
    );
    assert!(
        get(store, &d3, false, rule).await.is_some(),
        "{rule}: it is still registered"
    );
    let gone = store
        .remove_token(Provider::Webpush, "t3", "Unregistered", Some(T0), T0 + 4)
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove_token failed: {err}"));
    assert_eq!(
        gone.map(|d| d.id),
        Some(d3.clone()),
        "{rule}: not updated after T0"
    );
    let plain = store
        .remove_token(Provider::Email, "t4", "BadDeviceToken", None, T0 + 5)
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove_token failed: {err}"));
    assert_eq!(
        plain.map(|d| d.id),
        Some(d4.clone()),
        "{rule}: without a time"
    );
    let unknown = store
        .remove_token(Provider::Email, "t4", "x", None, T0 + 6)
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove_token failed: {err}"));
    assert_eq!(unknown, None, "{rule}: an unknown token removes nothing");

    let rule = "prune: removes devices not updated since `before`, as inactive";
    let old = register(
        store,
        new_device(Provider::Apns, "old", Platform::Ios, "", &[]),
        T0 + 10,
        rule,
    )
    .await;
    let fresh = register(
        store,
        new_device(Provider::Apns, "fresh", Platform::Ios, "", &[]),
        T0 + 20,
        rule,
    )
    .await;
    let pruned = store
        .prune(T0 + 20, T0 + 30)
        .await
        .unwrap_or_else(|err| panic!("{rule}: prune failed: {err}"));
    assert_eq!(
        pruned, 2,
        "{rule}: the re-registered t1 (T0+2) and `old` (T0+10)"
    );
    assert_eq!(
        ids_of(store, &DeviceFilter::default(), rule).await,
        vec![fresh.id.clone()],
        "{rule}: updated exactly at `before` is kept"
    );

    let rule = "removals: every removal is listed with its reason, newest first";
    let removals = every_page(
        2,
        |page| async move {
            store
                .removals(&page)
                .await
                .unwrap_or_else(|err| panic!("{rule}: removals failed: {err}"))
        },
        |r: &DeviceRemoval| r.device.id.clone(),
        rule,
    )
    .await;
    let seen: Vec<(String, &str, u64)> = removals
        .iter()
        .map(|r| (r.device.id.clone(), r.reason.as_str(), r.removed_at))
        .collect();
    // Removals recorded by one call (a prune, a remove by filter) may come in any order
    // among themselves.
    let groups: [Vec<(String, &str, u64)>; 4] = [
        vec![
            (old.id.clone(), "inactive", T0 + 30),
            (again.id.clone(), "inactive", T0 + 30),
        ],
        vec![(d4.clone(), "BadDeviceToken", T0 + 5)],
        vec![(d3.clone(), "Unregistered", T0 + 4)],
        vec![(d1.clone(), "api", T0 + 1), (d2.clone(), "api", T0 + 1)],
    ];
    assert_eq!(
        seen.len(),
        6,
        "{rule}: six devices were removed, got {seen:?}"
    );
    let mut at = 0;
    for group in groups {
        let mut got = seen[at..at + group.len()].to_vec();
        got.sort();
        let mut expected = group.clone();
        expected.sort();
        assert_eq!(got, expected, "{rule}: removal {at} onwards, all: {seen:?}");
        at += group.len();
    }
    assert!(
        removals
            .iter()
            .any(|r| r.device.token == "t1" && r.device.user == "alice"),
        "{rule}: a removal keeps the device as it was"
    );
    let with_total = store
        .removals(&PageRequest {
            include_total: true,
            ..first_page(1)
        })
        .await
        .unwrap_or_else(|err| panic!("{rule}: removals failed: {err}"));
    assert_eq!(with_total.total, Some(6), "{rule}: include_total");
}
