//! The codec's tests: every server packet decoded by `rumqttc`, both levels' client
//! packets read into one shape, and property tests over arbitrary and mutated bytes.

use super::*;

fn read_v4(bytes: &BytesMut) -> v4::Packet {
    let mut buf = bytes.clone();
    v4::Packet::read(&mut buf, 1 << 20).expect("rumqttc reads it")
}

fn read_v5(bytes: &BytesMut) -> v5::Packet {
    let mut buf = bytes.clone();
    v5::Packet::read(&mut buf, None).expect("rumqttc reads it")
}

#[test]
fn connect_of_both_levels_is_read_with_its_credentials() {
    let mut connect = v4::Connect::new("dev-1");
    connect.set_login("user", "the.jwt");
    connect.clean_session = false;
    connect.keep_alive = 30;
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("written");
    let whole = buf.clone();
    // One byte short: not yet.
    let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
    assert!(decode_connect(&mut partial, 1024).expect("ok").is_none());
    let (level, read) = decode_connect(&mut buf, 1024).expect("ok").expect("whole");
    assert_eq!(level, Level::V311);
    assert_eq!(read.client_id, "dev-1");
    assert_eq!(read.password.as_deref(), Some("the.jwt"));
    assert!(!read.clean_start);
    assert_eq!(read.session_expiry, u32::MAX);
    assert!(buf.is_empty(), "consumed");

    let mut properties = v5::ConnectProperties::new();
    properties.session_expiry_interval = Some(120);
    properties.receive_maximum = Some(10);
    let connect = v5::Connect {
        keep_alive: 10,
        client_id: "dev-2".into(),
        clean_start: true,
        properties: Some(properties),
    };
    let login = Some(v5::Login::new("", "tok"));
    let mut buf = BytesMut::new();
    connect.write(&None, &login, &mut buf).expect("written");
    let (level, read) = decode_connect(&mut buf, 1024).expect("ok").expect("whole");
    assert_eq!(level, Level::V5);
    assert_eq!(read.session_expiry, 120);
    assert_eq!(read.receive_maximum, Some(10));
    assert_eq!(read.password.as_deref(), Some("tok"));
    assert_eq!(read.username, None);
}

#[test]
fn bad_first_packets_are_refused() {
    let mut not_connect = BytesMut::from(&[0xC0u8, 0][..]);
    assert!(matches!(
        decode_connect(&mut not_connect, 1024),
        Err(DecodeError::Malformed(_))
    ));
    // MQTT 3.1 ("MQIsdp", level 3).
    let mut v31 = BytesMut::from(&b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c"[..]);
    assert_eq!(
        decode_connect(&mut v31, 1024).expect_err("an error"),
        DecodeError::UnsupportedLevel(3)
    );
    let mut huge = BytesMut::from(&[0x10u8, 0xff, 0xff, 0x7f][..]);
    assert!(matches!(
        decode_connect(&mut huge, 1024),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut bad_length = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert!(matches!(
        decode(Level::V311, &mut bad_length, 1 << 20),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn garbage_never_panics() {
    // Every prefix and a spread of byte patterns: errors or "need more", never a panic.
    let mut connect = v4::Connect::new("x");
    connect.set_login("u", "p");
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("written");
    for end in 0..buf.len() {
        let mut part = BytesMut::from(&buf[..end]);
        let _ = decode_connect(&mut part, 1024);
    }
    for seed in 0u32..2000 {
        let bytes: Vec<u8> = (0..(seed % 40))
            .map(|i| (seed.wrapping_mul(2_654_435_761).rotate_left(i) >> 3) as u8)
            .collect();
        for level in [Level::V311, Level::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode(level, &mut buf, 1024);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_connect(&mut buf, 1024);
    }
}

#[test]
fn packets_of_both_levels_become_one_shape() {
    let mut buf = BytesMut::new();
    let mut publish = v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::AtLeastOnce, b"hi".to_vec());
    publish.pkid = 7;
    publish.write(&mut buf).expect("written");
    v4::PingReq.write(&mut buf).expect("written");
    let packet = decode(Level::V311, &mut buf, 1024)
        .expect("decodes")
        .expect("whole");
    assert!(matches!(&packet, Packet::Publish(p) if p.pkid == 7 && p.qos == 1 && p.topic == "a/b"));
    assert_eq!(
        decode(Level::V311, &mut buf, 1024).expect("valid"),
        Some(Packet::PingReq)
    );
    assert_eq!(decode(Level::V311, &mut buf, 1024).expect("valid"), None);

    let mut buf = BytesMut::new();
    let mut filter = v5::Filter::new("s/+", rumqttc::v5::mqttbytes::QoS::ExactlyOnce);
    filter.nolocal = true;
    v5::Subscribe::new(filter, None)
        .write(&mut buf)
        .expect("written");
    // A DISCONNECT of remaining length 0.
    buf.extend_from_slice(&[0xE0, 0]);
    match decode(Level::V5, &mut buf, 1024)
        .expect("decodes")
        .expect("whole")
    {
        Packet::Subscribe { filters, .. } => {
            assert_eq!(filters[0].filter, "s/+");
            assert_eq!(filters[0].qos, 2);
            assert!(filters[0].no_local);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decode(Level::V5, &mut buf, 1024).expect("valid"),
        Some(Packet::Disconnect { reason: 0, .. })
    ));
}

#[test]
fn server_packets_decode_with_rumqttc() {
    let mut out = BytesMut::new();
    connack(
        &mut out,
        Level::V311,
        true,
        reason::SUCCESS,
        &Default::default(),
    );
    assert_eq!(
        read_v4(&out),
        v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, true))
    );
    let mut out = BytesMut::new();
    connack(
        &mut out,
        Level::V311,
        false,
        reason::NOT_AUTHORIZED,
        &Default::default(),
    );
    assert_eq!(
        read_v4(&out),
        v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::NotAuthorized,
            false
        ))
    );
    let mut out = BytesMut::new();
    let properties = ConnAckProperties {
        receive_maximum: Some(32),
        max_packet_size: Some(1 << 20),
        assigned_client_id: Some("abc".into()),
        session_expiry: Some(0),
        retain_available: true,
        wildcards_available: true,
        topic_alias_maximum: 16,
        shared_available: false,
        reason_string: Some("ok".into()),
    };
    connack(&mut out, Level::V5, false, reason::SUCCESS, &properties);
    match read_v5(&out) {
        v5::Packet::ConnAck(ack) => {
            let p = ack.properties.expect("properties");
            assert_eq!(p.receive_max, Some(32));
            assert_eq!(p.assigned_client_identifier.as_deref(), Some("abc"));
            assert_eq!(p.shared_subscription_available, Some(0));
            assert_eq!(p.topic_alias_max, Some(16));
            assert_eq!(
                p.subscription_identifiers_available, None,
                "absent: available"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut out = BytesMut::new();
    suback(&mut out, Level::V311, 9, &[1, reason::NOT_AUTHORIZED]);
    assert_eq!(
        read_v4(&out),
        v4::Packet::SubAck(v4::SubAck::new(
            9,
            vec![
                v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure
            ]
        ))
    );
    let mut out = BytesMut::new();
    suback(&mut out, Level::V5, 9, &[2, reason::NOT_AUTHORIZED]);
    match read_v5(&out) {
        v5::Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                v5::SubscribeReasonCode::Success(rumqttc::v5::mqttbytes::QoS::ExactlyOnce),
                v5::SubscribeReasonCode::NotAuthorized
            ]
        ),
        other => panic!("{other:?}"),
    }
    for level in [Level::V311, Level::V5] {
        let mut out = BytesMut::new();
        ack(&mut out, level, Ack::PubAck, 5, reason::SUCCESS);
        ack(&mut out, level, Ack::PubRec, 6, reason::SUCCESS);
        ack(&mut out, level, Ack::PubRel, 7, reason::SUCCESS);
        ack(&mut out, level, Ack::PubComp, 8, reason::SUCCESS);
        unsuback(&mut out, level, 10, &[0]);
        pingresp(&mut out);
        let mut count = 0;
        while !out.is_empty() {
            match level {
                Level::V311 => drop(v4::Packet::read(&mut out, 1024).expect("reads")),
                Level::V5 => drop(v5::Packet::read(&mut out, None).expect("reads")),
            }
            count += 1;
        }
        assert_eq!(count, 6);
    }
    let mut out = BytesMut::new();
    ack(&mut out, Level::V5, Ack::PubAck, 5, reason::NOT_AUTHORIZED);
    match read_v5(&out) {
        v5::Packet::PubAck(a) => assert_eq!(a.reason, v5::PubAckReason::NotAuthorized),
        other => panic!("{other:?}"),
    }
    let mut out = BytesMut::new();
    disconnect(
        &mut out,
        reason::KEEP_ALIVE_TIMEOUT,
        "no packet in 1.5 keep-alives",
    );
    match read_v5(&out) {
        v5::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn templates_become_each_subscribers_publish() {
    let payload = vec![b'x'; 200];
    let template = publish_template(Level::V311, "t/1", &payload, 1, false, &[], None);
    assert_eq!(template_qos(&template), 1);
    let mut out = BytesMut::new();
    assert!(finish_publish(
        &mut out,
        &template,
        &Finish {
            qos: 0,
            pkid: 0,
            dup: false,
            keep_retain: true,
            omit_topic: false
        },
        &[]
    ));
    assert_eq!(out.len(), finished_size(&template, 0));
    match read_v4(&out) {
        v4::Packet::Publish(p) => {
            assert_eq!(
                (p.qos, p.pkid, p.payload.len()),
                (rumqttc::mqttbytes::QoS::AtMostOnce, 0, 200)
            )
        }
        other => panic!("{other:?}"),
    }
    let retained = publish_template(Level::V311, "t/1", &payload, 1, true, &[], None);
    let mut out = BytesMut::new();
    assert!(finish_publish(
        &mut out,
        &retained,
        &Finish {
            qos: 1,
            pkid: 77,
            dup: true,
            keep_retain: true,
            omit_topic: false
        },
        &[]
    ));
    assert_eq!(out.len(), finished_size(&retained, 1));
    match read_v4(&out) {
        v4::Packet::Publish(p) => {
            assert_eq!(
                (p.qos, p.pkid, p.dup, p.retain),
                (rumqttc::mqttbytes::QoS::AtLeastOnce, 77, true, true)
            );
            assert_eq!(p.topic, "t/1");
            assert_eq!(p.payload.len(), 200);
        }
        other => panic!("{other:?}"),
    }
    let template = publish_template(Level::V5, "t/2", b"{}", 2, false, &[("k", "v")], None);
    let mut out = BytesMut::new();
    assert!(finish_publish(
        &mut out,
        &template,
        &Finish {
            qos: 2,
            pkid: 3,
            dup: false,
            keep_retain: true,
            omit_topic: false
        },
        &[]
    ));
    match read_v5(&out) {
        v5::Packet::Publish(p) => {
            assert_eq!(
                (p.qos, p.pkid),
                (rumqttc::v5::mqttbytes::QoS::ExactlyOnce, 3)
            );
            assert_eq!(&p.payload[..], b"{}");
            let props = p.properties.expect("user properties");
            assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!finish_publish(
        &mut BytesMut::new(),
        b"\x30",
        &Finish {
            qos: 0,
            pkid: 0,
            dup: false,
            keep_retain: true,
            omit_topic: false
        },
        &[]
    ));
}
/// A CONNECT, a SUBSCRIBE and a PUBLISH of each level, to mutate.
fn valid_streams() -> Vec<(Level, BytesMut)> {
    let mut v4_bytes = BytesMut::new();
    let mut connect = v4::Connect::new("c");
    connect.set_login("u", "p");
    connect.write(&mut v4_bytes).expect("written");
    v4::Subscribe::new("a/+", rumqttc::mqttbytes::QoS::AtLeastOnce)
        .write(&mut v4_bytes)
        .expect("written");
    let mut publish = v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::ExactlyOnce, b"x".to_vec());
    publish.pkid = 3;
    publish.write(&mut v4_bytes).expect("written");
    let mut v5_bytes = BytesMut::new();
    let connect = v5::Connect {
        keep_alive: 10,
        client_id: "c".into(),
        clean_start: true,
        properties: Some(v5::ConnectProperties::new()),
    };
    connect
        .write(&None, &Some(v5::Login::new("u", "p")), &mut v5_bytes)
        .expect("written");
    v5::Subscribe::new(
        v5::Filter::new("a/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
        None,
    )
    .write(&mut v5_bytes)
    .expect("written");
    vec![(Level::V311, v4_bytes), (Level::V5, v5_bytes)]
}

/// Decodes a whole stream as a connection does: a CONNECT, then packets until an error
/// or more bytes are needed. Must end, and never panic.
fn decode_stream(mut buf: BytesMut) {
    let Ok(Some((level, _))) = decode_connect(&mut buf, 1024) else {
        return;
    };
    while let Ok(Some(_)) = decode(level, &mut buf, 1024) {}
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        for level in [Level::V311, Level::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(level, &mut buf, 1024) {}
        }
        decode_stream(BytesMut::from(&bytes[..]));
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        which in 0usize..2,
        flips in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 1..6),
        cut in proptest::num::usize::ANY,
    ) {
        let (_, mut stream) = valid_streams().swap_remove(which);
        for (at, byte) in flips {
            let at = at % stream.len();
            stream[at] = byte;
        }
        let keep = cut % (stream.len() + 1);
        stream.truncate(keep);
        decode_stream(stream);
    }

    #[test]
    fn templates_decode_as_what_was_delivered(
        topic in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}",
        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
        qos in 0u8..3,
        pkid in 1u16..,
        retain in proptest::bool::ANY,
    ) {
        let template = publish_template(Level::V311, &topic, &payload, 2, retain, &[], None);
        let mut out = BytesMut::new();
        let finish = Finish {
            qos,
            pkid,
            keep_retain: true,
            ..Finish::default()
        };
        let finished = finish_publish(&mut out, &template, &finish, &[]);
        proptest::prop_assert!(finished);
        proptest::prop_assert_eq!(out.len(), finished_size(&template, qos));
        match v4::Packet::read(&mut out, 1 << 20).expect("rumqttc reads it") {
            v4::Packet::Publish(p) => {
                proptest::prop_assert_eq!(p.topic, topic);
                proptest::prop_assert_eq!(&p.payload[..], &payload[..]);
                proptest::prop_assert_eq!(p.qos as u8, qos);
                proptest::prop_assert_eq!(p.retain, retain);
                proptest::prop_assert_eq!(p.pkid, if qos == 0 { 0 } else { pkid });
            }
            other => proptest::prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn message_expiry_and_subscription_identifiers_are_mqtt5_properties() {
    let template = publish_template(Level::V5, "t/3", b"x", 1, false, &[("k", "v")], Some(30));
    let mut extra = BytesMut::new();
    subscription_identifier(&mut extra, 7);
    subscription_identifier(&mut extra, 300);
    let mut out = BytesMut::new();
    assert!(finish_publish(
        &mut out,
        &template,
        &Finish {
            qos: 1,
            pkid: 9,
            dup: false,
            keep_retain: true,
            omit_topic: false
        },
        &extra
    ));
    match read_v5(&out) {
        v5::Packet::Publish(p) => {
            assert_eq!(
                (p.pkid, &p.topic[..], &p.payload[..]),
                (9, &b"t/3"[..], &b"x"[..])
            );
            let props = p.properties.expect("properties");
            assert_eq!(props.message_expiry_interval, Some(30));
            assert_eq!(props.subscription_identifiers, vec![7, 300]);
            assert_eq!(
                props.user_properties,
                vec![("k".to_owned(), "v".to_owned())]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_message_expiry_of_a_finished_publish_is_rewritten_in_place() {
    let template = publish_template(Level::V5, "t/4", b"x", 1, false, &[("k", "v")], Some(30));
    for qos in [0, 1] {
        let mut out = BytesMut::new();
        let finish = Finish {
            qos,
            pkid: 3,
            ..Finish::default()
        };
        assert!(finish_publish(&mut out, &template, &finish, &[]));
        assert!(set_message_expiry(&mut out, 12));
        match read_v5(&out) {
            v5::Packet::Publish(p) => {
                let props = p.properties.expect("properties");
                assert_eq!(props.message_expiry_interval, Some(12), "QoS {qos}");
                assert_eq!(props.user_properties.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
    let plain = publish_template(Level::V5, "t/4", b"x", 0, false, &[], None);
    let mut out = BytesMut::new();
    assert!(finish_publish(&mut out, &plain, &Finish::default(), &[]));
    assert!(!set_message_expiry(&mut out, 12), "no expiry to rewrite");
}

#[test]
fn a_templates_retain_flag_is_kept_only_when_asked() {
    let template = publish_template(Level::V5, "t/4", b"x", 0, true, &[], None);
    for keep in [true, false] {
        let mut out = BytesMut::new();
        assert!(finish_publish(
            &mut out,
            &template,
            &Finish {
                qos: 0,
                pkid: 0,
                dup: false,
                keep_retain: keep,
                omit_topic: false
            },
            &[]
        ));
        match read_v5(&out) {
            v5::Packet::Publish(p) => assert_eq!(p.retain, keep),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_known_topic_is_left_out_for_its_alias() {
    let template = publish_template(Level::V5, "a/long/topic", b"x", 1, false, &[], None);
    let mut extra = BytesMut::new();
    topic_alias(&mut extra, 3);
    let finish = Finish {
        qos: 1,
        pkid: 5,
        omit_topic: true,
        ..Finish::default()
    };
    let mut out = BytesMut::new();
    assert!(finish_publish(&mut out, &template, &finish, &extra));
    match read_v5(&out) {
        v5::Packet::Publish(p) => {
            assert_eq!(
                (&p.topic[..], p.pkid, &p.payload[..]),
                (&b""[..], 5, &b"x"[..])
            );
            assert_eq!(p.properties.and_then(|p| p.topic_alias), Some(3));
        }
        other => panic!("{other:?}"),
    }
}
