//! FCM's checks on the `message` of a send request: known fields only, exactly one target
//! (`token`, `topic` or `condition`), `data` a map of strings, the payload within
//! [`MAX_PAYLOAD`], a well-formed token or topic.
//!
//! Owns: nothing. May touch: nothing.

use serde_json::Value;

use super::{MAX_PAYLOAD, Refusal};

const MESSAGE_FIELDS: &[&str] = &[
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "fcmOptions",
    "token",
    "topic",
    "condition",
];

pub(super) enum Target<'a> {
    Token(&'a str),
    Topic(&'a str),
    Condition(&'a str),
}

impl Target<'_> {
    pub(super) fn text(&self) -> &str {
        match self {
            Target::Token(t) | Target::Topic(t) | Target::Condition(t) => t,
        }
    }
}

/// FCM's checks on a `message`; its target when valid.
pub(super) fn validate_message(message: &Value) -> Result<Target<'_>, Refusal> {
    let Value::Object(fields) = message else {
        return Err(Refusal::field(
            "message",
            "Invalid value at 'message': expected an object.",
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !MESSAGE_FIELDS.contains(&k.as_str()))
    {
        return Err(Refusal::field(
            "message",
            format!(
                "Invalid JSON payload received. Unknown name \"{unknown}\" at 'message': Cannot find field."
            ),
        ));
    }
    let mut target = None;
    for (name, kind) in [("token", 0), ("topic", 1), ("condition", 2)] {
        let Some(value) = fields.get(name) else {
            continue;
        };
        let Some(text) = value.as_str() else {
            return Err(Refusal::field(
                &format!("message.{name}"),
                format!("Invalid value at 'message.{name}' (TYPE_STRING), {value}"),
            ));
        };
        if target.is_some() {
            return Err(Refusal::field(
                "message",
                format!(
                    "Invalid value at 'message' (oneof), oneof field 'target' is already set. Cannot set '{name}'"
                ),
            ));
        }
        target = Some(match kind {
            0 => Target::Token(text),
            1 => Target::Topic(text),
            _ => Target::Condition(text),
        });
    }
    let Some(target) = target else {
        return Err(Refusal::fcm(
            "INVALID_ARGUMENT",
            "Recipient of the message is not set.",
        ));
    };
    let mut size = 0;
    if let Some(data) = fields.get("data") {
        let Value::Object(data) = data else {
            return Err(Refusal::field(
                "message.data",
                "Invalid value at 'message.data': expected a map.",
            ));
        };
        for (index, (key, value)) in data.iter().enumerate() {
            let Some(text) = value.as_str() else {
                let field = format!("message.data[{index}].value");
                return Err(Refusal::field(
                    &field,
                    format!("Invalid value at '{field}' (TYPE_STRING), {value}"),
                ));
            };
            size += key.len() + text.len();
        }
    }
    if let Some(notification) = fields.get("notification") {
        if !notification.is_object() {
            return Err(Refusal::field(
                "message.notification",
                "Invalid value at 'message.notification': expected an object.",
            ));
        }
        size += notification.to_string().len();
    }
    if size > MAX_PAYLOAD {
        return Err(Refusal::fcm(
            "INVALID_ARGUMENT",
            format!("Message is too big: {size} bytes of payload, the limit is {MAX_PAYLOAD}."),
        ));
    }
    match target {
        Target::Token(token) => {
            let valid = !token.is_empty()
                && token.len() <= 4096
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'));
            if !valid {
                return Err(Refusal::fcm(
                    "INVALID_ARGUMENT",
                    "The registration token is not a valid FCM registration token",
                ));
            }
        }
        Target::Topic(topic) => {
            let valid = !topic.is_empty()
                && topic.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%')
                });
            if !valid {
                return Err(Refusal::fcm("INVALID_ARGUMENT", "Invalid topic name."));
            }
        }
        Target::Condition(condition) => {
            if !condition.contains("in topics") {
                return Err(Refusal::fcm(
                    "INVALID_ARGUMENT",
                    "Invalid condition expression.",
                ));
            }
        }
    }
    Ok(target)
}
