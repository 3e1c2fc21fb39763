//! From a received message to a publish request: channel, data and idempotency key.
//!
//! Two ways, chosen per source:
//! - **Envelope** (no `channel` template configured): the body is a JSON object
//!   `{"channel": "...", "data": <any JSON>, "idempotency_key": "...", "tags": {...}}`
//!   (`b64data` instead of `data` for bytes; `idempotency_key` and `tags` optional; other keys
//!   refused).
//! - **Derived** (a `channel` template): the channel comes from the template, the data is the
//!   body as is — JSON when it parses as JSON, bytes otherwise (base64 in JSON APIs).
//!
//! Templates are text with `{name}` placeholders over the message's attributes (`subject`,
//! `stream`, `routing_key`, `exchange`, `queue`, `header.NAME`, `field.NAME`, `column.NAME`,
//! `id`; which exist depends on the source) and `{name.N}` for the N-th (from 0) dot-separated
//! token of one (`{subject.1}` of `sensors.kitchen.temp` is `kitchen`).
//!
//! The idempotency key is the envelope's when it has one (used as is, so an application can
//! dedupe across the HTTP API and its broker); otherwise `<source>:<idempotency_key
//! template>`, by default `<source>:{id}` — the broker's own stable id of the message (the
//! JetStream stream sequence, the Redis entry id, the outbox row id, RabbitMQ's `message_id`
//! property). A message whose template names a missing attribute gets no key.
//!
//! May touch: nothing (pure functions).

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use herald_core::node::PublishRequest;
use herald_core::publication::Payload;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A message as a source received it, before mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub body: Bytes,
    /// What templates can name (`subject`, `header.x-tenant`, `column.channel`, …).
    pub attributes: Vec<(String, String)>,
    /// The broker's own id of the message, stable across redeliveries (`{id}`).
    pub id: Option<String>,
}

impl Received {
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((name.into(), value.into()));
        self
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    fn attribute(&self, name: &str) -> Option<&str> {
        if name == "id" {
            return self.id.as_deref();
        }
        self.attributes
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Why a message could not become a publish request (it is rejected, never retried).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("not a valid JSON envelope: {0}")]
    Envelope(String),
    #[error("the channel template names {0:?}, which this message does not have")]
    MissingAttribute(String),
    #[error("template {template:?}: {detail}")]
    Template { template: String, detail: String },
}

/// One placeholder or literal piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Attribute { name: String, token: Option<usize> },
}

/// A parsed `{name}` / `{name.N}` template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `text`; every placeholder must name an attribute in `known` (entries ending in
    /// `.` are prefixes, such as `header.`).
    pub fn parse(text: &str, known: &[&str]) -> Result<Self, MappingError> {
        let fail = |detail: String| MappingError::Template {
            template: text.to_owned(),
            detail,
        };
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| fail("a `{` is not closed".into()))?;
            let inner = &after[..close];
            if inner.is_empty() || inner.contains('{') {
                return Err(fail(format!("bad placeholder {{{inner}}}")));
            }
            pieces.push(placeholder(inner, known).map_err(fail)?);
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(fail("a `}` without its `{`".into()));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self { pieces })
    }

    /// The text for `message`, or the first attribute it lacks.
    pub fn render(&self, message: &Received) -> Result<String, MappingError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Attribute { name, token } => {
                    let missing = || {
                        let shown = match token {
                            Some(n) => format!("{name}.{n}"),
                            None => name.clone(),
                        };
                        MappingError::MissingAttribute(shown)
                    };
                    let value = message.attribute(name).ok_or_else(missing)?;
                    match token {
                        None => out.push_str(value),
                        Some(n) => out.push_str(value.split('.').nth(*n).ok_or_else(missing)?),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `name` or `name.N`, where `name` must be known (exactly, or under a known prefix).
fn placeholder(inner: &str, known: &[&str]) -> Result<Piece, String> {
    let is_known = |name: &str| {
        known.iter().any(|k| {
            if k.ends_with('.') {
                name.len() > k.len() && name.starts_with(k)
            } else {
                name == *k
            }
        })
    };
    if is_known(inner) {
        return Ok(Piece::Attribute {
            name: inner.to_owned(),
            token: None,
        });
    }
    if let Some((name, index)) = inner.rsplit_once('.')
        && let Ok(token) = index.parse::<usize>()
        && is_known(name)
    {
        return Ok(Piece::Attribute {
            name: name.to_owned(),
            token: Some(token),
        });
    }
    Err(format!(
        "unknown placeholder {{{inner}}}; this source has {}",
        known
            .iter()
            .map(|k| {
                if k.ends_with('.') {
                    format!("{{{k}NAME}}")
                } else {
                    format!("{{{k}}}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// How one source's messages become publish requests.
#[derive(Clone, Debug)]
pub struct Mapping {
    source: String,
    channel: Option<Template>,
    idempotency_key: Template,
}

/// The JSON envelope a message may carry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    channel: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    b64data: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

impl Mapping {
    /// `channel`: the template, or `None` for envelopes. `idempotency_key`: the template of the
    /// derived key (default `{id}`). `known`: the attributes this source's messages have.
    pub fn new(
        source: &str,
        channel: Option<&str>,
        idempotency_key: Option<&str>,
        known: &[&str],
    ) -> Result<Self, MappingError> {
        Ok(Self {
            source: source.to_owned(),
            channel: channel.map(|t| Template::parse(t, known)).transpose()?,
            idempotency_key: Template::parse(idempotency_key.unwrap_or("{id}"), known)?,
        })
    }

    pub fn map(&self, message: &Received) -> Result<PublishRequest, MappingError> {
        let Some(channel) = &self.channel else {
            return self.map_envelope(message);
        };
        let mut request = PublishRequest::new(channel.render(message)?, raw_payload(&message.body));
        request.idempotency_key = self.derived_key(message);
        Ok(request)
    }

    fn map_envelope(&self, message: &Received) -> Result<PublishRequest, MappingError> {
        let envelope: Envelope<'_> = serde_json::from_slice(&message.body)
            .map_err(|e| MappingError::Envelope(e.to_string()))?;
        let data = match (envelope.data, envelope.b64data) {
            (Some(json), None) => Payload::Json(Bytes::copy_from_slice(json.get().as_bytes())),
            (None, Some(encoded)) => Payload::Binary(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|e| MappingError::Envelope(format!("b64data: {e}")))?
                    .into(),
            ),
            _ => {
                return Err(MappingError::Envelope(
                    "exactly one of `data` and `b64data` is required".into(),
                ));
            }
        };
        let mut request = PublishRequest::new(envelope.channel, data);
        request.tags = envelope.tags;
        request.idempotency_key = envelope
            .idempotency_key
            .or_else(|| self.derived_key(message));
        Ok(request)
    }

    fn derived_key(&self, message: &Received) -> Option<String> {
        let key = self.idempotency_key.render(message).ok()?;
        Some(format!("{}:{key}", self.source))
    }
}

/// The body as JSON when it is JSON, as bytes otherwise.
fn raw_payload(body: &Bytes) -> Payload {
    if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        Payload::Json(body.clone())
    } else {
        Payload::Binary(body.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["subject", "stream", "header.", "id"];

    fn message() -> Received {
        Received::new(&b"{\"t\":21.5}"[..])
            .with("subject", "sensors.kitchen.temp")
            .with("stream", "SENSORS")
            .with("header.tenant", "acme")
            .with_id("42")
    }

    #[test]
    fn a_template_derives_the_channel_and_the_body_is_the_data() {
        let mapping = Mapping::new(
            "s",
            Some("sensors:{subject.1}-{header.tenant}"),
            None,
            KNOWN,
        )
        .expect("valid");
        let request = mapping.map(&message()).expect("maps");
        assert_eq!(request.channel, "sensors:kitchen-acme");
        assert_eq!(
            request.data,
            Payload::Json(Bytes::from_static(b"{\"t\":21.5}"))
        );
        assert_eq!(request.idempotency_key.as_deref(), Some("s:42"));
    }

    #[test]
    fn a_body_that_is_not_json_is_bytes() {
        let mapping = Mapping::new("s", Some("c"), None, KNOWN).expect("valid");
        let request = mapping
            .map(&Received::new(&b"\xff\x00raw"[..]).with_id("1"))
            .expect("maps");
        assert!(request.data.is_binary());
        let empty = mapping.map(&Received::new(Bytes::new())).expect("maps");
        assert!(empty.data.is_binary());
        assert_eq!(empty.idempotency_key, None, "no id, no key");
    }

    #[test]
    fn a_missing_attribute_or_token_rejects_the_message() {
        let mapping = Mapping::new("s", Some("x:{subject.7}"), None, KNOWN).expect("valid");
        assert_eq!(
            mapping.map(&message()).map(|r| r.channel),
            Err(MappingError::MissingAttribute("subject.7".into()))
        );
        let mapping = Mapping::new("s", Some("x:{header.other}"), None, KNOWN).expect("valid");
        assert!(matches!(
            mapping.map(&message()),
            Err(MappingError::MissingAttribute(_))
        ));
    }

    #[test]
    fn bad_templates_are_refused_when_configured() {
        for bad in [
            "{",
            "a}",
            "{}",
            "{subjet}",
            "{header.}",
            "{routing_key}",
            "{{id}}",
        ] {
            assert!(
                Template::parse(bad, KNOWN).is_err(),
                "{bad:?} should be refused"
            );
        }
        let key = Template::parse("{header.x-id}", KNOWN).expect("valid");
        assert_eq!(
            key.render(&Received::new(Bytes::new()).with("header.x-id", "k")),
            Ok("k".into())
        );
    }

    #[test]
    fn an_envelope_names_channel_data_and_key() {
        let mapping = Mapping::new("src", None, None, KNOWN).expect("valid");
        let body =
            br#"{"channel":"news:1","data":{"a":[1,2]},"idempotency_key":"k1","tags":{"t":"v"}}"#;
        let request = mapping
            .map(&Received::new(&body[..]).with_id("9"))
            .expect("maps");
        assert_eq!(request.channel, "news:1");
        assert_eq!(
            request.data,
            Payload::Json(Bytes::from_static(b"{\"a\":[1,2]}"))
        );
        assert_eq!(request.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(request.tags.get("t").map(String::as_str), Some("v"));
        // Without a key of its own, the broker's id keys it.
        let body = br#"{"channel":"c","b64data":"AAE="}"#;
        let request = mapping
            .map(&Received::new(&body[..]).with_id("9"))
            .expect("maps");
        assert_eq!(
            request.data,
            Payload::Binary(Bytes::from_static(b"\x00\x01"))
        );
        assert_eq!(request.idempotency_key.as_deref(), Some("src:9"));
    }

    #[test]
    fn bad_envelopes_are_errors() {
        let mapping = Mapping::new("src", None, None, KNOWN).expect("valid");
        for body in [
            &b"not json"[..],
            br#"{"data":1}"#,
            br#"{"channel":"c"}"#,
            br#"{"channel":"c","data":1,"b64data":"AA=="}"#,
            br#"{"channel":"c","data":1,"extra":true}"#,
            br#"{"channel":"c","b64data":"***"}"#,
            br#"[1,2]"#,
        ] {
            assert!(
                matches!(
                    mapping.map(&Received::new(body)),
                    Err(MappingError::Envelope(_))
                ),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
