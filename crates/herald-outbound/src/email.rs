//! The email sender: one message to one address over SMTP (lettre, tokio, rustls with ring).
//!
//! Owns: [`EmailConfig`], [`EmailSender`] and its small connection pool, and the mapping of
//! SMTP replies to [`SendError`].
//!
//! May touch: the network, only towards the one configured relay.
//!
//! Why our own transaction and pool instead of lettre's pooled `AsyncSmtpTransport`: that
//! transport reports a negative reply without saying which command it answered, and here it
//! matters. A `550` to `RCPT TO` means "this mailbox does not exist" (remove the device); a
//! `550` to `MAIL FROM` means the relay refuses *our* sender, and treating that as a dead
//! address would delete every email device at once. So the sender drives `MAIL`/`RCPT`/`DATA`
//! itself on lettre's `AsyncSmtpConnection` and keeps idle connections for reuse. A bonus: a
//! refused recipient costs an `RSET`, not a new connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use lettre::Address;
use lettre::message::{Mailbox, Message, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Quit, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use parking_lot::Mutex;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::sender::{Destination, EmailNotification, SendError, Sender, Sent, Target};

/// A pooled connection idle longer than this is closed rather than reused: RFC 5321 lets a
/// server drop an idle client after 5 minutes, and many do so much sooner.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Many relays cap the messages per connection (often at 100); start afresh before that.
const MAX_MESSAGES_PER_CONNECTION: u32 = 100;

/// How the connection to the relay is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with `STARTTLS` (port 587). If the server does not offer
    /// STARTTLS the attempt fails: never a silent fall back to plain text.
    #[default]
    Starttls,
    /// TLS from the first byte (implicit TLS, "SMTPS", port 465).
    Tls,
    /// No encryption at all. Only for tests and a relay on the same host or a trusted local
    /// network; credentials are refused with it.
    None,
}

impl SmtpSecurity {
    fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        }
    }
}

fn default_request_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_max_connections() -> usize {
    4
}

/// `[push.email]`: the SMTP relay Herald sends email notifications through.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub host: String,
    /// Default: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub security: SmtpSecurity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The sender mailbox: `noreply@example.com` or `Example <noreply@example.com>`.
    pub from: String,
    /// Bound on one attempt, including waiting for a free connection.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// Most connections open to the relay at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Extra CA certificate (PEM) to trust for the relay, besides the system roots. Meant for
    /// tests and private relays with their own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// FOR TESTING ONLY: accept any certificate. Makes TLS worthless against an attacker.
    #[serde(default)]
    pub accept_invalid_certs: bool,
}

impl std::fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("request_timeout", &self.request_timeout)
            .field("max_connections", &self.max_connections)
            .field("ca_file", &self.ca_file)
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmailConfigError {
    #[error("email.from {from:?} is not a mailbox: {reason}")]
    From { from: String, reason: String },
    #[error("email: username and password go together")]
    Credentials,
    #[error(
        "email: credentials need security = \"starttls\" or \"tls\" (they would cross the network in clear)"
    )]
    CredentialsInClear,
    #[error("email: cannot read ca_file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("email: TLS set-up: {0}")]
    Tls(String),
    #[error("email: {0} must be more than zero")]
    Zero(&'static str),
}

struct Pooled {
    conn: AsyncSmtpConnection,
    idle_since: Instant,
    messages: u32,
}

/// Sends email through one SMTP relay, reusing connections.
pub struct EmailSender {
    host: String,
    port: u16,
    security: SmtpSecurity,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    from: Mailbox,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for EmailSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSender")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// Which command a failure answered; it decides what a `5xx` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Connect,
    Mail,
    Rcpt,
    Data,
    Message,
}

impl Stage {
    fn describe(self) -> &'static str {
        match self {
            Stage::Connect => "connecting to the SMTP relay",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::Message => "the message content",
        }
    }
}

/// Why a transaction stopped.
#[derive(Debug)]
enum Failure {
    Smtp(lettre::transport::smtp::Error),
    /// The relay lacks an extension this message needs (SMTPUTF8, 8BITMIME).
    Unsupported(&'static str),
}

type StageError = (Stage, Failure);

fn at(stage: Stage) -> impl FnOnce(lettre::transport::smtp::Error) -> StageError {
    move |err| (stage, Failure::Smtp(err))
}

impl EmailSender {
    pub fn new(config: &EmailConfig) -> Result<Self, EmailConfigError> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e: lettre::address::AddressError| EmailConfigError::From {
                from: config.from.clone(),
                reason: e.to_string(),
            })?;
        let credentials = match (&config.username, &config.password) {
            (Some(user), Some(pass)) => Some(Credentials::new(user.clone(), pass.clone())),
            (None, None) => None,
            _ => return Err(EmailConfigError::Credentials),
        };
        if credentials.is_some() && config.security == SmtpSecurity::None {
            return Err(EmailConfigError::CredentialsInClear);
        }
        if config.request_timeout.is_zero() {
            return Err(EmailConfigError::Zero("request_timeout"));
        }
        if config.max_connections == 0 {
            return Err(EmailConfigError::Zero("max_connections"));
        }
        let tls = match config.security {
            SmtpSecurity::None => None,
            SmtpSecurity::Starttls | SmtpSecurity::Tls => {
                let mut builder = TlsParameters::builder(config.host.clone())
                    .dangerous_accept_invalid_certs(config.accept_invalid_certs);
                if let Some(path) = &config.ca_file {
                    let pem = std::fs::read(path).map_err(|source| EmailConfigError::CaFile {
                        path: path.clone(),
                        source,
                    })?;
                    let cert = Certificate::from_pem(&pem)
                        .map_err(|e| EmailConfigError::Tls(format!("{}: {e}", path.display())))?;
                    builder = builder.add_root_certificate(cert);
                }
                Some(
                    builder
                        .build_rustls()
                        .map_err(|e| EmailConfigError::Tls(e.to_string()))?,
                )
            }
        };
        Ok(Self {
            host: config.host.clone(),
            port: config.port.unwrap_or(config.security.default_port()),
            security: config.security,
            tls,
            credentials,
            from,
            hello: ClientId::default(),
            timeout: config.request_timeout.as_duration(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(config.max_connections)),
        })
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
        let wrapper = match self.security {
            SmtpSecurity::Tls => self.tls.clone(),
            _ => None,
        };
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(self.timeout),
            &self.hello,
            wrapper,
            None,
        )
        .await?;
        if self.security == SmtpSecurity::Starttls
            && let Some(tls) = self.tls.clone()
        {
            // lettre's starttls() refuses a server that does not offer it, so a stripped
            // STARTTLS capability fails here instead of sending in clear.
            conn.starttls(tls, &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }

    /// An idle connection that is still worth using, if any.
    fn take_idle(&self) -> Option<Pooled> {
        let mut idle = self.idle.lock();
        while let Some(pooled) = idle.pop() {
            if pooled.idle_since.elapsed() < IDLE_TIMEOUT && !pooled.conn.has_broken() {
                return Some(pooled);
            }
            // Too old: dropping it closes the socket; a QUIT would only cost a round trip.
        }
        None
    }

    fn put_idle(&self, mut pooled: Pooled) {
        if pooled.conn.has_broken() || pooled.messages >= MAX_MESSAGES_PER_CONNECTION {
            tokio::spawn(async move {
                let _ = pooled.conn.command(Quit).await;
            });
            return;
        }
        pooled.idle_since = Instant::now();
        self.idle.lock().push(pooled);
    }

    /// One attempt: a pooled or new connection, one transaction. A pooled connection that
    /// fails before any recipient was accepted was probably closed by the server while idle;
    /// that case gets one more try on a fresh connection.
    async fn attempt(&self, to: &Address, bytes: &[u8]) -> Result<String, StageError> {
        // The semaphore is never closed; if it were, going on without a permit is harmless.
        let _permit = self.permits.acquire().await.ok();
        if let Some(mut pooled) = self.take_idle() {
            match self.transaction(&mut pooled.conn, to, bytes).await {
                Ok(reply) => {
                    pooled.messages += 1;
                    self.put_idle(pooled);
                    return Ok(reply);
                }
                Err((Stage::Mail, Failure::Smtp(err))) if is_stale(&err) => {
                    // Closed while idle: fall through to a fresh connection.
                }
                Err(err) => {
                    self.recycle(pooled, &err).await;
                    return Err(err);
                }
            }
        }
        let conn = self.connect().await.map_err(at(Stage::Connect))?;
        let mut pooled = Pooled {
            conn,
            idle_since: Instant::now(),
            messages: 0,
        };
        match self.transaction(&mut pooled.conn, to, bytes).await {
            Ok(reply) => {
                pooled.messages += 1;
                self.put_idle(pooled);
                Ok(reply)
            }
            Err(err) => {
                self.recycle(pooled, &err).await;
                Err(err)
            }
        }
    }

    /// After a negative reply the connection is still in sync: `RSET` clears the transaction
    /// and the connection goes back to the pool. After anything else it is dropped.
    async fn recycle(&self, mut pooled: Pooled, (_, failure): &StageError) {
        let in_sync = match failure {
            Failure::Smtp(err) => err.status().is_some_and(|code| u16::from(code) != 421),
            Failure::Unsupported(_) => true,
        };
        if in_sync && pooled.conn.command(Rset).await.is_ok() {
            self.put_idle(pooled);
        }
    }

    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        to: &Address,
        bytes: &[u8],
    ) -> Result<String, StageError> {
        let mut params = Vec::new();
        let ascii = |a: &Address| AsRef::<str>::as_ref(a).is_ascii();
        if !ascii(to) || !ascii(&self.from.email) {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err((
                    Stage::Mail,
                    Failure::Unsupported("the address is not ASCII and the relay lacks SMTPUTF8"),
                ));
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !bytes.is_ascii() {
            // lettre encodes bodies as 7bit, quoted-printable or base64, so this is rare.
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err((
                    Stage::Mail,
                    Failure::Unsupported("the message is 8-bit and the relay lacks 8BITMIME"),
                ));
            }
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        conn.command(Mail::new(Some(self.from.email.clone()), params))
            .await
            .map_err(at(Stage::Mail))?;
        conn.command(Rcpt::new(to.clone(), vec![]))
            .await
            .map_err(at(Stage::Rcpt))?;
        conn.command(Data).await.map_err(at(Stage::Data))?;
        let reply = conn.message(bytes).await.map_err(at(Stage::Message))?;
        Ok(reply.message().collect::<Vec<_>>().join(" "))
    }

    fn build_message(
        &self,
        to: &Address,
        notification: &EmailNotification,
    ) -> Result<(String, Vec<u8>), SendError> {
        let mut random = [0u8; 16];
        rand::rng().fill_bytes(&mut random);
        let message_id = format!(
            "<{}@{}>",
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            self.from.email.domain()
        );
        let builder = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.clone()))
            // A subject is one line; lettre would encode a line break rather than let it
            // start a header, but a mail client would still show it broken.
            .subject(notification.subject.replace(['\r', '\n'], " "))
            .message_id(Some(message_id.clone()));
        let message = match &notification.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                notification.text.clone(),
                html.clone(),
            )),
            None => builder.singlepart(SinglePart::plain(notification.text.clone())),
        }
        .map_err(|e| SendError::Rejected {
            reason: format!("cannot build the email: {e}"),
        })?;
        Ok((message_id, message.formatted()))
    }
}

/// A reused connection that fails at its first command without a usable reply was most
/// likely closed by the server while idle (421 is the polite form of that).
fn is_stale(err: &lettre::transport::smtp::Error) -> bool {
    match err.status() {
        None => true,
        Some(code) => u16::from(code) == 421,
    }
}

#[async_trait]
impl Sender for EmailSender {
    type Notification = EmailNotification;

    /// `target.app` is not used: there is one relay and one sender address for all apps.
    async fn send(
        &self,
        target: &Target,
        notification: &EmailNotification,
    ) -> Result<Sent, SendError> {
        if target.provider != Provider::Email {
            return Err(SendError::Rejected {
                reason: format!(
                    "the email sender got a target for {}",
                    target.provider.as_str()
                ),
            });
        }
        let Destination::Token(token) = &target.to else {
            return Err(SendError::Rejected {
                reason: "email sends to an address only".into(),
            });
        };
        let to: Address = token.trim().parse().map_err(|e| SendError::Rejected {
            reason: format!("{token:?} is not an email address: {e}"),
        })?;
        let (message_id, bytes) = self.build_message(&to, notification)?;
        match tokio::time::timeout(self.timeout, self.attempt(&to, &bytes)).await {
            Err(_) => Err(SendError::Retry {
                reason: format!("SMTP relay did not answer within {:?}", self.timeout),
                after: None,
            }),
            Ok(Ok(_reply)) => Ok(Sent { message_id }),
            Ok(Err((stage, Failure::Smtp(err)))) => Err(classify(stage, &err)),
            Ok(Err((_, Failure::Unsupported(reason)))) => Err(SendError::Rejected {
                reason: reason.to_owned(),
            }),
        }
    }
}

/// A failed attempt, by the command it answered and the reply code (RFC 5321 §4.2).
fn classify(stage: Stage, err: &lettre::transport::smtp::Error) -> SendError {
    let text = format!("{} failed: {err}", stage.describe());
    let Some(code) = err.status() else {
        // No reply code: network, TLS, timeout, a malformed reply. Worth another try.
        return SendError::Retry {
            reason: text,
            after: None,
        };
    };
    let code = u16::from(code);
    if (400..500).contains(&code) {
        return SendError::Retry {
            reason: text,
            after: None,
        };
    }
    // A choice: 550/551/553 to RCPT TO say the mailbox does not exist, has moved or its name
    // is not allowed, so the device (the address) is removed. Unless the reply's enhanced
    // status (RFC 3463) is a 5.7.x policy refusal (spam, relay denied, blocked): then the
    // mailbox may be fine and only this message is refused.
    let reply = std::error::Error::source(err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let policy = reply.trim_start().starts_with("5.7.");
    if stage == Stage::Rcpt && matches!(code, 550 | 551 | 553) && !policy {
        return SendError::Unregistered {
            reason: text,
            since: None,
        };
    }
    if stage == Stage::Connect {
        // A permanent refusal while connecting (530 STARTTLS required, 535 bad credentials)
        // is our configuration, not this message: retrying after a fix will work.
        return SendError::Retry {
            reason: text,
            after: None,
        };
    }
    SendError::Rejected { reason: text }
}
