//! Typed parameters and results of the core server API methods, in the JSON shape of
//! Centrifugo's server API (so that `cent` and `cent.js` work unchanged); the gRPC adapter
//! maps the same types to and from Protobuf. Requests reject unknown fields so that a typo such as
//! `skip_hisotry` is an error instead of a silently different publish.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use herald_core::node::NodeInfo;
use herald_core::presence::PresenceStats;
use herald_core::publication::{ClientInfo, Payload, Publication, StreamPosition};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

pub use herald_core::integer;

/// Keeps `"data": null` distinct from an absent `data`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishParams {
    #[serde(default)]
    pub channel: String,
    #[serde(default, deserialize_with = "present")]
    pub data: Option<Box<RawValue>>,
    #[serde(default)]
    pub b64data: Option<String>,
    #[serde(default)]
    pub skip_history: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Accepted for compatibility; delta compression is not implemented, so it has no effect.
    #[serde(default)]
    pub delta: bool,
    /// Push the publication to users' devices (see docs/push.md, "Live first").
    #[serde(default)]
    pub push: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastParams {
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default, deserialize_with = "present")]
    pub data: Option<Box<RawValue>>,
    #[serde(default)]
    pub b64data: Option<String>,
    #[serde(default)]
    pub skip_history: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub delta: bool,
    /// Push each publication to its channel's users' devices, as for `publish`.
    #[serde(default)]
    pub push: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    #[serde(default)]
    pub channel: String,
    /// 0: position only; negative: everything retained; N: at most N.
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: i64,
    #[serde(default)]
    pub since: Option<SincePosition>,
    #[serde(default)]
    pub reverse: bool,
}

/// `history.since`: a stream position. Unlike the method parameters, unknown fields here are
/// ignored (as documented), so a client that sends a richer position object still works.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SincePosition {
    #[serde(deserialize_with = "integer::required")]
    pub offset: u64,
    pub epoch: String,
}

impl From<SincePosition> for StreamPosition {
    fn from(position: SincePosition) -> Self {
        StreamPosition::new(position.offset, position.epoch)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectParams {
    #[serde(default)]
    pub user: String,
    /// Only this connection of the user.
    pub client: Option<String>,
    /// Connections (client ids) to keep.
    #[serde(default)]
    pub whitelist: Vec<String>,
    pub disconnect: Option<DisconnectCode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectCode {
    #[serde(deserialize_with = "integer::required")]
    pub code: u16,
    /// The reason the connections are closed with (WebSocket close frame, the disconnect
    /// push of the other transports); empty: the code range's. At most 123 bytes.
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokenParams {
    /// The token's `jti`.
    #[serde(default)]
    pub uid: String,
    /// Remember until (Unix seconds); default a day from now.
    #[serde(default, deserialize_with = "integer::optional")]
    pub expire_at: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateUserTokensParams {
    #[serde(default)]
    pub user: String,
    /// Tokens with `iat` before this (Unix seconds) are refused; default now.
    #[serde(default, deserialize_with = "integer::optional")]
    pub issued_before: Option<u64>,
    /// Remember until (Unix seconds); default a day from now.
    #[serde(default, deserialize_with = "integer::optional")]
    pub expire_at: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeParams {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub channel: String,
    /// Only this connection of the user.
    pub client: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelParams {
    #[serde(default)]
    pub channel: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsParams {
    #[serde(default)]
    pub pattern: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyParams {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchParams {
    /// Each command is an object with one key: the method name, holding its parameters.
    pub commands: Vec<HashMap<String, Box<RawValue>>>,
    #[serde(default)]
    pub parallel: bool,
}

/// Turns `data` / `b64data` into a payload; `b64data` wins when both are set.
pub fn payload(data: Option<Box<RawValue>>, b64data: Option<String>) -> Result<Payload, String> {
    if let Some(encoded) = b64data.filter(|s| !s.is_empty()) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map_err(|e| format!("b64data is not valid base64: {e}"))?;
        return Ok(Payload::Binary(bytes.into()));
    }
    match data {
        Some(raw) => Ok(Payload::Json(bytes::Bytes::from(String::from(
            Box::<str>::from(raw),
        )))),
        None => Err("data or b64data is required".into()),
    }
}

#[derive(Debug, Default, Serialize)]
pub struct PublishResult {
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl From<herald_core::PublishResult> for PublishResult {
    fn from(result: herald_core::PublishResult) -> Self {
        let position = result.position.unwrap_or_default();
        Self {
            offset: position.offset,
            epoch: position.epoch,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ApiPublication {
    /// JSON data verbatim; `null` for binary data (then in `b64data`).
    pub data: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64data: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    /// Milliseconds since the Unix epoch when the node accepted the publication.
    pub time: u64,
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("null is valid JSON")
}

impl From<Publication> for ApiPublication {
    fn from(publication: Publication) -> Self {
        let (data, b64data) = match publication.data {
            Payload::Json(bytes) => {
                let raw = String::from_utf8(bytes.to_vec())
                    .ok()
                    .and_then(|text| RawValue::from_string(text).ok());
                (raw.unwrap_or_else(null), None)
            }
            Payload::Binary(bytes) => (
                null(),
                Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            ),
        };
        Self {
            data,
            b64data,
            offset: publication.offset,
            tags: publication.tags,
            info: publication.info.map(|info| (*info).clone()),
            time: publication.time_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HistoryResult {
    #[serde(serialize_with = "api_publications")]
    pub publications: Vec<Publication>,
    pub offset: u64,
    pub epoch: String,
}

/// Publications as the JSON API shows them ([`ApiPublication`]).
fn api_publications<S: serde::Serializer>(
    publications: &[Publication],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(publications.iter().cloned().map(ApiPublication::from))
}

/// One channel's outcome in a broadcast: its result or its error.
#[derive(Debug, Serialize)]
pub struct BroadcastReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<PublishResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::ErrorBody>,
}

#[derive(Debug, Serialize)]
pub struct BroadcastResult {
    pub responses: Vec<BroadcastReply>,
}

#[derive(Debug, Serialize)]
pub struct PresenceResult {
    pub presence: HashMap<String, ClientInfo>,
}

#[derive(Debug, Serialize)]
pub struct PresenceStatsResult {
    pub num_clients: u64,
    pub num_users: u64,
}

impl From<PresenceStats> for PresenceStatsResult {
    fn from(stats: PresenceStats) -> Self {
        Self {
            num_clients: stats.num_clients,
            num_users: stats.num_users,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChannelInfo {
    pub num_clients: u64,
}

#[derive(Debug, Serialize)]
pub struct ChannelsResult {
    pub channels: BTreeMap<String, ChannelInfo>,
}

#[derive(Debug, Serialize)]
pub struct NodeResult {
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_clients: u64,
    pub num_users: u64,
    pub num_channels: u64,
    pub num_subs: u64,
    pub uptime: u64,
}

impl From<NodeInfo> for NodeResult {
    fn from(info: NodeInfo) -> Self {
        Self {
            uid: info.uid,
            name: info.name,
            version: info.version,
            num_clients: 0,
            num_users: 0,
            num_channels: info.num_channels,
            num_subs: info.num_subscriptions,
            uptime: info.uptime.as_secs(),
        }
    }
}

#[cfg(feature = "redis")]
impl From<herald_store::redis::NodeRecord> for NodeResult {
    fn from(record: herald_store::redis::NodeRecord) -> Self {
        Self {
            uid: record.uid,
            name: record.name,
            version: record.version,
            num_clients: record.num_clients,
            num_users: record.num_users,
            num_channels: record.num_channels,
            num_subs: record.num_subs,
            uptime: record.uptime_secs,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct InfoResult {
    pub nodes: Vec<NodeResult>,
}

#[derive(Debug, Serialize)]
pub struct EmptyResult {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_keeps_null_and_prefers_b64() {
        let params: PublishParams =
            serde_json::from_str(r#"{"channel":"a","data":null}"#).expect("parse");
        assert_eq!(
            payload(params.data, params.b64data),
            Ok(Payload::Json("null".into()))
        );
        let params: PublishParams = serde_json::from_str(r#"{"channel":"a"}"#).expect("parse");
        assert!(payload(params.data, params.b64data).is_err());
        let params: PublishParams =
            serde_json::from_str(r#"{"channel":"a","data":{"x":1},"b64data":"AAE="}"#)
                .expect("parse");
        assert_eq!(
            payload(params.data, params.b64data),
            Ok(Payload::Binary(vec![0u8, 1].into()))
        );
        assert!(payload(None, Some("!!".into())).is_err());
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = serde_json::from_str::<PublishParams>(
            r#"{"channel":"a","data":1,"skip_hisotry":true}"#,
        )
        .expect_err("typo");
        assert!(err.to_string().contains("skip_hisotry"));
    }

    #[test]
    fn integers_are_json_numbers_in_the_field_range() {
        let limit = |text: &str| {
            serde_json::from_str::<HistoryParams>(&format!(r#"{{"channel":"a","limit":{text}}}"#))
                .map(|p| p.limit)
        };
        assert_eq!(limit("2").ok(), Some(2));
        assert_eq!(limit("2.0").ok(), Some(2), "2.0 is the integer 2");
        assert_eq!(limit("-1.0").ok(), Some(-1));
        assert_eq!(limit("-9223372036854775808").ok(), Some(i64::MIN));
        assert_eq!(limit("9223372036854775807").ok(), Some(i64::MAX));
        for bad in [
            "2.5",
            "9223372036854775808",
            "1e300",
            "-1e19",
            "\"2\"",
            "true",
        ] {
            assert!(limit(bad).is_err(), "limit {bad}");
        }
        let expire_at = |text: &str| {
            serde_json::from_str::<RevokeTokenParams>(&format!(
                r#"{{"uid":"a","expire_at":{text}}}"#
            ))
            .map(|p| p.expire_at)
        };
        assert_eq!(expire_at("null").ok(), Some(None));
        assert_eq!(expire_at("1795000000.0").ok(), Some(Some(1_795_000_000)));
        assert_eq!(expire_at("18446744073709551615").ok(), Some(Some(u64::MAX)));
        for bad in ["18446744073709551616", "-1", "-0.5", "1e20"] {
            assert!(expire_at(bad).is_err(), "expire_at {bad}");
        }
        let missing: InvalidateUserTokensParams =
            serde_json::from_str(r#"{"user":"a"}"#).expect("parse");
        assert_eq!((missing.issued_before, missing.expire_at), (None, None));
        let code = |text: &str| {
            serde_json::from_str::<DisconnectCode>(&format!(r#"{{"code":{text}}}"#)).map(|c| c.code)
        };
        assert_eq!(code("3000.0").ok(), Some(3000));
        assert!(code("65536").is_err());
        let since: HistoryParams = serde_json::from_str(
            r#"{"channel":"a","since":{"offset":3.0,"epoch":"e","unknown":1}}"#,
        )
        .expect("unknown fields in since are ignored");
        let since = StreamPosition::from(since.since.expect("since"));
        assert_eq!(since, StreamPosition::new(3, "e"));
    }
}
