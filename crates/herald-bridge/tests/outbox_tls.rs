//! The PostgreSQL outbox source over TLS, against the machine's PostgreSQL
//! (`HERALD_TEST_POSTGRES`, default `postgres@127.0.0.1:5432/test`), which serves Debian's
//! self-signed "snakeoil" certificate for `localhost` (`HERALD_TEST_POSTGRES_CERT`, default
//! `/etc/ssl/certs/ssl-cert-snakeoil.pem`). Each `sslmode` keeps libpq's meaning: `require`
//! encrypts without checking the certificate, `verify-full` checks chain and name.

use std::time::Duration;

use herald_bridge::outbox::{OutboxConfig, OutboxSource, ddl};
use herald_bridge::{Outcome, Source};
use tokio_postgres::NoTls;

fn server() -> String {
    std::env::var("HERALD_TEST_POSTGRES").unwrap_or_else(|_| "postgres@127.0.0.1:5432/test".into())
}

fn certificate() -> String {
    std::env::var("HERALD_TEST_POSTGRES_CERT")
        .unwrap_or_else(|_| "/etc/ssl/certs/ssl-cert-snakeoil.pem".into())
}

/// A plain admin connection, for setting up and for looking at the source's connection.
async fn admin() -> tokio_postgres::Client {
    let url = format!("postgres://{}?sslmode=disable", server());
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} must be reachable: {e}"));
    tokio::spawn(connection);
    client
}

/// A fresh outbox table with one row.
async fn table(admin: &tokio_postgres::Client, name: &str) {
    let sql = ddl(name, name).expect("ddl");
    admin.batch_execute(&sql).await.expect("create the table");
    admin
        .execute(
            &format!("INSERT INTO {name} (channel, data) VALUES ('tls:a', '{{\"n\":1}}')"),
            &[],
        )
        .await
        .expect("insert");
}

fn source(url: String, table: &str) -> OutboxSource {
    OutboxSource::new(OutboxConfig {
        url,
        table: table.to_owned(),
        notify_channel: table.to_owned(),
        poll_interval: Duration::from_millis(200),
        connection_name: table.to_owned(),
    })
    .expect("source")
}

/// Whether the source's connection (by application name) is encrypted.
async fn encrypted(admin: &tokio_postgres::Client, name: &str) -> bool {
    let row = admin
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&name],
        )
        .await
        .expect("the source's connection is listed");
    row.get(0)
}

async fn drop_table(admin: &tokio_postgres::Client, name: &str) {
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
        .await
        .expect("drop the table");
}

async fn receives_its_row(source: &mut OutboxSource) {
    let batch = source.receive(10).await.expect("receive");
    assert_eq!(batch.len(), 1, "the one row");
    let settled = batch
        .into_iter()
        .map(|(id, _)| (id, Outcome::Done))
        .collect();
    source.settle(settled).await.expect("settle");
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        herald_core::publication::new_epoch().to_lowercase()
    )
}

#[tokio::test]
async fn sslmode_require_encrypts_without_checking_the_certificate() {
    let admin = admin().await;
    let name = unique("tls_require");
    table(&admin, &name).await;
    let mut source = source(format!("postgres://{}?sslmode=require", server()), &name);
    source.connect().await.expect("connects over TLS");
    assert!(encrypted(&admin, &name).await, "the connection is TLS");
    receives_its_row(&mut source).await;
    source.disconnect().await;
    drop_table(&admin, &name).await;
}

#[tokio::test]
async fn sslmode_disable_stays_plain() {
    let admin = admin().await;
    let name = unique("tls_disable");
    table(&admin, &name).await;
    let mut source = source(format!("postgres://{}?sslmode=disable", server()), &name);
    source.connect().await.expect("connects");
    assert!(!encrypted(&admin, &name).await, "the connection is plain");
    receives_its_row(&mut source).await;
    source.disconnect().await;
    drop_table(&admin, &name).await;
}

#[tokio::test]
async fn verify_full_accepts_a_certificate_from_sslrootcert_for_the_host() {
    let admin = admin().await;
    let name = unique("tls_verify");
    table(&admin, &name).await;
    // The snakeoil certificate names `localhost`.
    let url = server().replacen("127.0.0.1", "localhost", 1);
    let mut source = source(
        format!(
            "postgres://{url}?sslmode=verify-full&sslrootcert={}",
            certificate()
        ),
        &name,
    );
    source.connect().await.expect("the certificate verifies");
    assert!(encrypted(&admin, &name).await);
    receives_its_row(&mut source).await;
    source.disconnect().await;
    drop_table(&admin, &name).await;
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_name_or_an_unknown_issuer() {
    let name = unique("tls_refused");
    // Chained to the root given, but issued for `localhost`, not 127.0.0.1.
    let mut wrong_name = source(
        format!(
            "postgres://{}?sslmode=verify-full&sslrootcert={}",
            server(),
            certificate()
        ),
        &name,
    );
    let error = wrong_name.connect().await.expect_err("refused").to_string();
    assert!(error.contains("certificate"), "{error}");
    // verify-ca checks the chain only: the same certificate passes.
    let admin = admin().await;
    table(&admin, &name).await;
    let mut chain_only = source(
        format!(
            "postgres://{}?sslmode=verify-ca&sslrootcert={}",
            server(),
            certificate()
        ),
        &name,
    );
    chain_only
        .connect()
        .await
        .expect("verify-ca ignores the name");
    chain_only.disconnect().await;
    // Without sslrootcert the OS's roots decide: a self-signed certificate is not among them.
    let mut unknown = source(
        format!("postgres://{}?sslmode=verify-full", server()),
        &name,
    );
    let error = unknown.connect().await.expect_err("refused").to_string();
    assert!(error.contains("certificate"), "{error}");
    drop_table(&admin, &name).await;
}
